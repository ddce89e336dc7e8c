//! Issue-4 figures of `debvisor-bench` (docs/architecture.md §7, "time to converge N"): managed networks.
//!
//! 1. **Convergence of N managed networks from etcd**, create then delete, on a standalone
//!    node (so it is the primary: every network gets its VXLAN `dvvx<vni>`, bridge
//!    `dvbr<vni>`, gateway address and a dnsmasq). A real `debvisord` and etcd run inside one
//!    fresh network namespace per case; the N specs go in with as few transactions as etcd
//!    allows (128 operations each). *Create* is timed from just before the first transaction
//!    to the arrival of the last `networks/<vni>/status/<node>` put with `"state":"ready"` on
//!    a watch opened before it (the watch thread stamps each event on arrival), plus the last
//!    bridge seen by `ip -j link show type bridge` polled every 50 ms. *Delete* is one
//!    `networks/` prefix delete, timed until no `dvbr*`/`dvvx*` link and no dnsmasq (`ip netns
//!    pids` + `/proc/<pid>/comm`) is left and, with the firewall, no per-network nft chain
//!    (the prefix delete removes the status keys itself, so they tell nothing). Run once
//!    with `DEBVISOR_FIREWALL_ENABLED=false` and once with `true`. Peak RSS is the daemon's
//!    `VmHWM` (and the largest `VmRSS` sampled every 50 ms); dnsmasq processes are counted
//!    every 50 ms. The daemon's log lines give where the time goes (nft applies and their
//!    `elapsed_ms`), `/proc/<pid>/stat` its CPU and that of its reaped children (nft).
//! 2. **nft apply cost of N networks' chains** through the firewall crate, inside a fresh
//!    namespace (nft forked from a thread that entered it, as in the daemon, so no
//!    `ip netns exec`): (a) one batch with all N networks from the base ruleset, median of 5;
//!    (b) one apply per network with 1, 2, …, N networks (what re-applying on every network
//!    change costs), total; (c) `ensure` with no change (the resync cost per tick); plus the
//!    same batch and listing through a plain blocking `nft`, to separate nft's own time from
//!    the driver's (its `wait_timeout` polls with a 1, 2, 4, … 20 ms backoff).

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use debvisor_firewall::{
    Acl, AclAction, AclProto, Cidr, Firewall, FirewallConfig, NetworkRules, Nft, PortRange,
    Ruleset, TABLE,
};
use debvisor_tests::{DaemonBuilder, DaemonProcess, EtcdProcess, NetNs};
use etcd_client::{Client, ConnectOptions, DeleteOptions, EventType, Txn, TxnOp, WatchOptions};
use serde_json::Value;

use super::clock::{now_utc_string, parse_rfc3339_micros};
use super::host::{clk_tck, machine_ticks, status_kib, Cpu};
use super::logs::{num_field, str_field};
use super::report::{bench_command, publish, Machine};
use super::stats::{mib, ms, nearest_rank, summarize};
use crate::{Args, BenchResult};

/// Start marker of the generated section in `docs/benchmarks.md`.
const MARK_START: &str = "<!-- bench:networks:start -->";
/// End marker of the generated section in `docs/benchmarks.md`.
const MARK_END: &str = "<!-- bench:networks:end -->";
/// Most networks the address plan holds (10.100.0.0/24 … 10.109.255.0/24).
pub(crate) const MAX_NETWORKS: usize = 2560;
/// Node name of the daemon (status keys are `networks/<vni>/status/<NODE>`).
const NODE: &str = "bench-net";
/// The daemon's network keys.
const KEY_PREFIX: &str = "/debvisor/networks/";
/// VNI of the first network.
const FIRST_VNI: usize = 1000;
/// etcd's default limit of operations per transaction (`--max-txn-ops`).
const TXN_MAX_OPS: usize = 128;
/// Poll interval of the host probes (links, processes, RSS).
const POLL: Duration = Duration::from_millis(50);
/// How long the daemon may take to reach `run`.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Base limit of one phase (create or delete), plus [`PHASE_PER_NETWORK`] per network.
const PHASE_BASE: Duration = Duration::from_secs(60);
/// Extra phase limit per network.
const PHASE_PER_NETWORK: Duration = Duration::from_secs(1);
/// Limit for opening the watch (connect + created response).
const WATCH_START: Duration = Duration::from_secs(10);
/// Pause after `run` and after create, so each phase starts from a quiet daemon.
const SETTLE: Duration = Duration::from_secs(2);
/// Keepalive (and resync) interval of the daemon: the production default.
const KEEPALIVE_INTERVAL: &str = "5s";
/// Lease TTL of the daemon: the production default.
const KEEPALIVE_TTL: &str = "15s";
/// Repetitions of the one-batch apply.
const BATCH_REPS: usize = 5;
/// Repetitions of the no-change `ensure`.
const ENSURE_REPS: usize = 10;
/// Repetitions of building the model and its JSON.
const BUILD_REPS: usize = 5;

/// Both figures, printed and written between the `bench:networks` markers.
pub(crate) fn run(args: &Args, machine: &Machine) -> BenchResult<()> {
    let started = now_utc_string();
    let n = args.networks;
    let tck = clk_tck()?;
    eprintln!("debvisor-bench: [networks 1/4] kernel floor for {n} networks (ip -batch)");
    let floor = kernel_floor(n)?;
    let mut cases = Vec::new();
    for (i, firewall) in [false, true].into_iter().enumerate() {
        eprintln!(
            "debvisor-bench: [networks {}/4] converge {n} managed networks, firewall {}",
            i + 2,
            if firewall { "on" } else { "off" }
        );
        cases.push(converge_case(n, firewall, tck)?);
    }
    eprintln!("debvisor-bench: [networks 4/4] nft apply cost of {n} networks' chains");
    let fw = bench_nft(n)?;
    let report = render(args, machine, &started, &cases, &floor, &fw);
    publish(args, MARK_START, MARK_END, &report)
}

// ---------------------------------------------------------------------------------------
// Address plan and specs
// ---------------------------------------------------------------------------------------

/// VNI of network `i`.
fn vni(i: usize) -> u32 {
    u32::try_from(FIRST_VNI + i).unwrap_or(u32::MAX)
}

/// Second and third octet of network `i`'s /24 (`10.A.B.0/24`).
fn octets(i: usize) -> (usize, usize) {
    (100 + i / 256, i % 256)
}

/// The managed spec of network `i`.
fn spec(i: usize) -> String {
    let (a, b) = octets(i);
    format!(
        r#"{{"type":"managed","ipv4":{{"network":"10.{a}.{b}.0/24","gateway":"10.{a}.{b}.1"}},"dhcp4":{{"enabled":true,"start":"10.{a}.{b}.100","end":"10.{a}.{b}.200"}}}}"#
    )
}

/// The VNI of a `/debvisor/networks/<vni>/status/<NODE>` key.
fn status_vni(key: &str) -> Option<u32> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, sub) = rest.split_once('/')?;
    (sub == format!("status/{NODE}")).then_some(())?;
    id.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Watch thread
// ---------------------------------------------------------------------------------------

/// A put seen by the `networks/` watch, stamped on arrival, or the watch's failure.
enum WatchEv {
    Put {
        key: String,
        value: Vec<u8>,
        at: Instant,
    },
    Failed(String),
}

/// A watch on [`KEY_PREFIX`] running on its own thread inside the namespace. Dropping it
/// stops the thread (it checks a flag every 100 ms) and joins it.
struct Watcher {
    rx: mpsc::Receiver<WatchEv>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Open the watch and return once etcd confirmed it (so no later write is missed).
    fn start(ns: &str, endpoint: String) -> BenchResult<Watcher> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_c = stop.clone();
        let ns = ns.to_owned();
        let thread = std::thread::Builder::new()
            .name("bench-watch".into())
            .spawn(move || {
                if let Err(e) = watch_thread(&ns, &endpoint, &tx, &ready_tx, &stop_c) {
                    let _ = ready_tx.send(Err(e.clone()));
                    let _ = tx.send(WatchEv::Failed(e));
                }
            })
            .map_err(|e| format!("spawning the watch thread: {e}"))?;
        let w = Watcher {
            rx,
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(WATCH_START) {
            Ok(Ok(())) => Ok(w),
            Ok(Err(e)) => Err(format!("opening the watch: {e}")),
            Err(_) => Err(format!("the watch was not created within {WATCH_START:?}")),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Body of the watch thread: enter `ns`, watch, forward events until told to stop.
fn watch_thread(
    ns: &str,
    endpoint: &str,
    tx: &mpsc::Sender<WatchEv>,
    ready: &mpsc::Sender<Result<(), String>>,
    stop: &AtomicBool,
) -> Result<(), String> {
    debvisor_tests::netns::enter_thread(ns).map_err(|e| format!("entering {ns}: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("building a tokio runtime: {e}"))?;
    rt.block_on(async {
        let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
        let mut c = tokio::time::timeout(WATCH_START, Client::connect([endpoint], Some(opts)))
            .await
            .map_err(|_| format!("connecting to {endpoint} timed out"))?
            .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
        let mut s = tokio::time::timeout(
            WATCH_START,
            c.watch(KEY_PREFIX, Some(WatchOptions::new().with_prefix())),
        )
        .await
        .map_err(|_| format!("watching {KEY_PREFIX} timed out"))?
        .map_err(|e| format!("watching {KEY_PREFIX}: {e}"))?;
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let msg = match tokio::time::timeout(Duration::from_millis(100), s.message()).await {
                Err(_) => continue,
                Ok(r) => r
                    .map_err(|e| format!("watch {KEY_PREFIX}: {e}"))?
                    .ok_or_else(|| format!("watch {KEY_PREFIX}: stream closed"))?,
            };
            let at = Instant::now();
            if msg.created() {
                let _ = ready.send(Ok(()));
            }
            if msg.canceled() {
                return Err(format!("watch canceled by etcd: {}", msg.cancel_reason()));
            }
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                if ev.event_type() != EventType::Put {
                    continue;
                }
                let e = WatchEv::Put {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    value: kv.value().to_vec(),
                    at,
                };
                if tx.send(e).is_err() {
                    return Ok(());
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// Host probes
// ---------------------------------------------------------------------------------------

/// Run `program args…` and return its stdout, failing with its stderr.
fn output(program: &str, args: &[&str]) -> BenchResult<String> {
    let o = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("running {program} {}: {e}", args.join(" ")))?;
    if !o.status.success() {
        return Err(format!(
            "{program} {} failed with {}: {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Link names of namespace `ns` (only bridges with `bridges_only`).
fn link_names(ns: &str, bridges_only: bool) -> BenchResult<Vec<String>> {
    let mut args = vec!["-n", ns, "-j", "link", "show"];
    if bridges_only {
        args.extend(["type", "bridge"]);
    }
    let text = output("ip", &args)?;
    let v: Value = serde_json::from_str(text.trim())
        .map_err(|e| format!("ip {}: bad JSON: {e}", args.join(" ")))?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.get("ifname").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default())
}

/// PIDs of the dnsmasq processes running in namespace `ns`.
fn dnsmasq_pids(ns: &str) -> BenchResult<Vec<u32>> {
    let text = output("ip", &["netns", "pids", ns])?;
    Ok(text
        .split_whitespace()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end() == "dnsmasq")
        })
        .filter_map(|pid| pid.parse().ok())
        .collect())
}

/// CPU counters at one instant of a case.
struct CpuSnapshot {
    daemon: Cpu,
    etcd: u64,
    /// Own ticks of each running dnsmasq.
    dnsmasq: BTreeMap<u32, u64>,
    /// Busy and total ticks of the machine.
    machine: (u64, u64),
}

impl CpuSnapshot {
    fn take(daemon: u32, etcd: u32, ns: &str) -> BenchResult<CpuSnapshot> {
        Ok(CpuSnapshot {
            daemon: Cpu::read(daemon)?,
            etcd: Cpu::read(etcd)?.own,
            dnsmasq: dnsmasq_pids(ns)?
                .into_iter()
                .filter_map(|p| Cpu::read(p).ok().map(|c| (p, c.own)))
                .collect(),
            machine: machine_ticks()?,
        })
    }
}

/// CPU ticks spent between two snapshots, by whom.
#[derive(Debug, Clone, Copy, Default)]
struct PhaseCpu {
    /// debvisord itself (utime + stime).
    daemon: u64,
    /// Children the daemon reaped in the phase (nft; dnsmasq stopped in the phase),
    /// counting only what they used inside the phase.
    reaped: u64,
    /// dnsmasq processes still running at the end.
    dnsmasq_live: u64,
    etcd: u64,
    /// Whole machine: busy and total ticks (all CPUs).
    machine_busy: u64,
    machine_total: u64,
}

impl PhaseCpu {
    fn between(a: &CpuSnapshot, b: &CpuSnapshot) -> PhaseCpu {
        let d = b.daemon.since(a.daemon);
        // dnsmasq that exited in the phase: their whole-life CPU is in the daemon's
        // cutime; take off what they had used before the phase.
        let before_exited: u64 = a
            .dnsmasq
            .iter()
            .filter(|(p, _)| !b.dnsmasq.contains_key(p))
            .map(|(_, t)| *t)
            .sum();
        let live: u64 = b
            .dnsmasq
            .iter()
            .map(|(p, t)| t.saturating_sub(a.dnsmasq.get(p).copied().unwrap_or(0)))
            .sum();
        PhaseCpu {
            daemon: d.own,
            reaped: d.children.saturating_sub(before_exited),
            dnsmasq_live: live,
            etcd: b.etcd.saturating_sub(a.etcd),
            machine_busy: b.machine.0.saturating_sub(a.machine.0),
            machine_total: b.machine.1.saturating_sub(a.machine.1),
        }
    }
}

/// Samples the daemon's RSS and the namespace's dnsmasq count on every poll.
struct Sampler {
    pid: u32,
    ns: String,
    rss_max_kib: u64,
    dnsmasq_max: usize,
    dnsmasq_last: usize,
}

impl Sampler {
    fn sample(&mut self) -> BenchResult<()> {
        self.rss_max_kib = self.rss_max_kib.max(status_kib(self.pid, "VmRSS")?);
        self.dnsmasq_last = dnsmasq_pids(&self.ns)?.len();
        self.dnsmasq_max = self.dnsmasq_max.max(self.dnsmasq_last);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Figure 1: convergence from etcd
// ---------------------------------------------------------------------------------------

/// What the daemon's log lines say about one phase.
#[derive(Debug, Clone, Default)]
struct LogStats {
    /// `elapsed_ms` of every "nft ruleset applied" line (apply + read-back).
    nft_ms: Vec<f64>,
    dnsmasq_started: usize,
    dnsmasq_stopped: usize,
    warnings: usize,
    errors: usize,
    /// Per network: its first `start` line → its `done` line (ms, daemon clock).
    spans: Vec<f64>,
    /// `observe` failures retried by the reactor (EBUSY: a netlink dump interrupted by
    /// concurrent link changes).
    retries: usize,
}

impl LogStats {
    /// Parse the JSON lines of one phase; a network's span runs from its first `start`
    /// line to its `done` line.
    fn parse(lines: &[String], start: &str, done: &str) -> LogStats {
        let mut out = LogStats::default();
        let mut first: BTreeMap<u64, i64> = BTreeMap::new();
        for line in lines {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            match str_field(&v, "level") {
                Some("WARN") => out.warnings += 1,
                Some("ERROR") => out.errors += 1,
                _ => {}
            }
            let msg = str_field(&v, "message").unwrap_or_default();
            match msg {
                "nft ruleset applied" => out.nft_ms.extend(num_field(&v, "elapsed_ms")),
                "dnsmasq started" => out.dnsmasq_started += 1,
                "dnsmasq stopped" => out.dnsmasq_stopped += 1,
                "reconcile failed; will retry" => out.retries += 1,
                _ => {}
            }
            let (Some(net), Some(ts)) = (
                v.get("network").and_then(Value::as_u64),
                str_field(&v, "timestamp").and_then(parse_rfc3339_micros),
            ) else {
                continue;
            };
            if msg == start {
                first.entry(net).or_insert(ts);
            }
            if let (true, Some(t)) = (msg == done, first.get(&net)) {
                out.spans.push((ts - t) as f64 / 1000.0);
            }
        }
        out
    }
}

/// Results of one phase (create or delete).
#[derive(Debug, Clone, Default)]
struct Phase {
    /// Create: per network, the arrival of its ready status, sorted.
    status: Vec<Duration>,
    /// Create: last bridge seen. Delete: last `dvbr*`/`dvvx*` link gone.
    links: Duration,
    /// Delete: last dnsmasq gone.
    dnsmasq_gone: Option<Duration>,
    /// Delete with the firewall: no per-network chain left.
    chains_gone: Option<Duration>,
    /// dnsmasq processes at the end of the phase.
    dnsmasq_end: usize,
    cpu: PhaseCpu,
    logs: LogStats,
}

/// Results of one convergence case.
#[derive(Debug, Clone)]
struct CaseResult {
    firewall: bool,
    txns: usize,
    /// Round trips of the spec transactions.
    write: Duration,
    create: Phase,
    delete: Phase,
    rss_before_kib: u64,
    rss_ready_kib: u64,
    rss_after_kib: u64,
    rss_max_sampled_kib: u64,
    hwm_kib: u64,
    dnsmasq_peak: usize,
    clk_tck: u64,
}

impl CaseResult {
    /// Time until every status is ready (create) — the convergence time.
    fn create_total(&self) -> Duration {
        self.create
            .status
            .last()
            .copied()
            .unwrap_or_default()
            .max(self.create.links)
    }

    /// Time until every link, every dnsmasq and every per-network chain is gone (delete).
    fn delete_total(&self) -> Duration {
        self.delete
            .links
            .max(self.delete.dnsmasq_gone.unwrap_or_default())
            .max(self.delete.chains_gone.unwrap_or_default())
    }
}

/// Limit of one phase for `n` networks.
fn phase_timeout(n: usize) -> Duration {
    PHASE_BASE + PHASE_PER_NETWORK * u32::try_from(n).unwrap_or(u32::MAX)
}

/// Turn a harness error into a bench error with context.
fn ctx<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// One case: fresh namespace, etcd and daemon; create N networks, then delete them.
/// Locals drop in reverse order on every path: watch thread, daemon (SIGTERM, then SIGKILL),
/// etcd, namespace (killing whatever is left in it, e.g. dnsmasq).
fn converge_case(n: usize, firewall: bool, tck: u64) -> BenchResult<CaseResult> {
    let ns = NetNs::create("dvbench").map_err(ctx("creating a network namespace"))?;
    let etcd = EtcdProcess::start_in(ns.name(), [127, 0, 0, 1].into())
        .map_err(ctx("starting etcd in the namespace"))?;
    let mut d = DaemonBuilder::new(NODE)
        .netns(ns.name())
        .endpoints(&[etcd.endpoint()])
        .env(
            "DEBVISOR_FIREWALL_ENABLED",
            if firewall { "true" } else { "false" },
        )
        .env("DEBVISOR_KEEPALIVE_INTERVAL", KEEPALIVE_INTERVAL)
        .env("DEBVISOR_KEEPALIVE_LEASE_TTL", KEEPALIVE_TTL)
        .spawn()
        .map_err(ctx("spawning debvisord"))?;
    d.wait_run(RUN_TIMEOUT)
        .map_err(ctx("waiting for debvisord to reach run"))?;
    let pid = d.pid();
    let etcd_pid = etcd.pid().ok_or("etcd is not running")?;
    let watcher = Watcher::start(ns.name(), etcd.endpoint())?;
    std::thread::sleep(SETTLE);
    let rss_before_kib = status_kib(pid, "VmRSS")?;
    let mut sampler = Sampler {
        pid,
        ns: ns.name().to_owned(),
        rss_max_kib: rss_before_kib,
        dnsmasq_max: 0,
        dnsmasq_last: 0,
    };

    // Create.
    let cpu0 = CpuSnapshot::take(pid, etcd_pid, ns.name())?;
    let log0 = d.lines().len();
    let specs: Vec<(String, String)> = (0..n)
        .map(|i| (format!("{KEY_PREFIX}{}/spec", vni(i)), spec(i)))
        .collect();
    let (t0, write, txns) = etcd
        .with_client(|mut c| async move {
            let err = |e: etcd_client::Error| debvisor_tests::HarnessError::State(e.to_string());
            // Warm the connection so the first transaction is not a connect.
            c.get("bench-warmup", None).await.map_err(err)?;
            let t0 = Instant::now();
            let mut txns = 0;
            for chunk in specs.chunks(TXN_MAX_OPS) {
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
                    .collect();
                c.txn(Txn::new().and_then(ops)).await.map_err(err)?;
                txns += 1;
            }
            Ok((t0, t0.elapsed(), txns))
        })
        .map_err(ctx("writing the network specs"))?;
    let mut create = wait_created(&mut d, &watcher, &mut sampler, n, t0)?;
    create.cpu = PhaseCpu::between(&cpu0, &CpuSnapshot::take(pid, etcd_pid, ns.name())?);
    let log1 = d.lines().len();
    create.logs = LogStats::parse(
        &d.lines()[log0..log1],
        "network host change",
        "network converged on this host",
    );
    let rss_ready_kib = status_kib(pid, "VmRSS")?;
    std::thread::sleep(SETTLE);
    sampler.sample()?;

    // Delete.
    let cpu1 = CpuSnapshot::take(pid, etcd_pid, ns.name())?;
    let log1 = d.lines().len();
    let t1 = etcd
        .with_client(|mut c| async move {
            let err = |e: etcd_client::Error| debvisor_tests::HarnessError::State(e.to_string());
            c.get("bench-warmup", None).await.map_err(err)?;
            let t1 = Instant::now();
            c.delete(KEY_PREFIX, Some(DeleteOptions::new().with_prefix()))
                .await
                .map_err(err)?;
            Ok(t1)
        })
        .map_err(ctx("deleting the networks"))?;
    let mut delete = wait_deleted(&mut d, &watcher, &mut sampler, n, firewall, t1)?;
    delete.cpu = PhaseCpu::between(&cpu1, &CpuSnapshot::take(pid, etcd_pid, ns.name())?);
    let log2 = d.lines().len();
    delete.logs = LogStats::parse(
        &d.lines()[log1..log2],
        "dnsmasq stopped",
        "network removed from this host",
    );
    let rss_after_kib = status_kib(pid, "VmRSS")?;
    let hwm_kib = status_kib(pid, "VmHWM")?;
    drop(watcher);
    Ok(CaseResult {
        firewall,
        txns,
        write,
        create,
        delete,
        rss_before_kib,
        rss_ready_kib,
        rss_after_kib,
        rss_max_sampled_kib: sampler.rss_max_kib,
        hwm_kib,
        dnsmasq_peak: sampler.dnsmasq_max,
        clk_tck: tck,
    })
}

/// Fail when the daemon exited.
fn check_running(d: &mut DaemonProcess, what: &str) -> BenchResult<()> {
    if d.is_running() {
        return Ok(());
    }
    Err(format!("debvisord exited while {what}\n{}", d.tail(40)))
}

/// Poll until every network's status is ready and every bridge exists.
fn wait_created(
    d: &mut DaemonProcess,
    w: &Watcher,
    s: &mut Sampler,
    n: usize,
    t0: Instant,
) -> BenchResult<Phase> {
    let limit = phase_timeout(n);
    let wanted: Vec<String> = (0..n).map(|i| format!("dvbr{}", vni(i))).collect();
    let mut ready: BTreeMap<u32, Duration> = BTreeMap::new();
    let mut last_bridge = None;
    let mut next = Instant::now();
    loop {
        while let Ok(ev) = w.rx.try_recv() {
            match ev {
                WatchEv::Put { key, value, at } => {
                    let Some(v) = status_vni(&key) else { continue };
                    let st: Value = serde_json::from_slice(&value)
                        .map_err(|e| format!("{key}: bad JSON status: {e}"))?;
                    match str_field(&st, "state") {
                        Some("ready") => {
                            ready.entry(v).or_insert(at.saturating_duration_since(t0));
                        }
                        Some("error") => return Err(format!("network {v} failed: {st}")),
                        _ => {}
                    }
                }
                WatchEv::Failed(e) => return Err(e),
            }
        }
        if last_bridge.is_none() {
            let have: HashSet<String> = link_names(&s.ns, true)?.into_iter().collect();
            if wanted.iter().all(|b| have.contains(b)) {
                last_bridge = Some(t0.elapsed());
            }
        }
        s.sample()?;
        if let (n_ready, Some(links)) = (ready.len(), last_bridge) {
            if n_ready == n {
                let mut status: Vec<Duration> = ready.into_values().collect();
                status.sort();
                return Ok(Phase {
                    status,
                    links,
                    dnsmasq_end: s.dnsmasq_last,
                    ..Phase::default()
                });
            }
        }
        check_running(d, "the networks were being created")?;
        if t0.elapsed() >= limit {
            return Err(format!(
                "timed out after {limit:?} creating {n} networks: {} ready, bridges {}",
                ready.len(),
                if last_bridge.is_some() {
                    "complete"
                } else {
                    "incomplete"
                }
            ));
        }
        next += POLL;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

/// Per-network chains (`net<vni>-in/out`) in table `inet debvisor` of namespace `ns`.
fn net_chains(ns: &str) -> BenchResult<usize> {
    let text = output(
        "ip",
        &["netns", "exec", ns, "nft", "-j", "list", "chains", "inet"],
    )?;
    let v: Value = serde_json::from_str(text.trim())
        .map_err(|e| format!("nft -j list chains inet: bad JSON: {e}"))?;
    Ok(v.get("nftables")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|o| o.get("chain"))
                .filter(|c| c.get("table").and_then(Value::as_str) == Some("debvisor"))
                .filter(|c| {
                    c.get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|n| n.starts_with("net"))
                })
                .count()
        })
        .unwrap_or(0))
}

/// Poll until no network link and no dnsmasq is left and, with the firewall, no
/// per-network chain (checked only once the rest is gone: the daemon removes a network's
/// chains after its links, and the table only shrinks from there).
fn wait_deleted(
    d: &mut DaemonProcess,
    w: &Watcher,
    s: &mut Sampler,
    n: usize,
    firewall: bool,
    t1: Instant,
) -> BenchResult<Phase> {
    let limit = phase_timeout(n);
    let mut links_gone = None;
    let mut dnsmasq_gone = None;
    let mut chains_gone = None;
    let mut next = Instant::now();
    loop {
        while let Ok(ev) = w.rx.try_recv() {
            if let WatchEv::Failed(e) = ev {
                return Err(e);
            }
        }
        if links_gone.is_none() {
            let left = link_names(&s.ns, false)?
                .iter()
                .filter(|l| l.starts_with("dvbr") || l.starts_with("dvvx"))
                .count();
            if left == 0 {
                links_gone = Some(t1.elapsed());
            }
        }
        s.sample()?;
        if dnsmasq_gone.is_none() && s.dnsmasq_last == 0 {
            dnsmasq_gone = Some(t1.elapsed());
        }
        if let (Some(links), Some(dm)) = (links_gone, dnsmasq_gone) {
            if firewall && chains_gone.is_none() && net_chains(&s.ns)? == 0 {
                chains_gone = Some(t1.elapsed().max(links).max(dm));
            }
            if !firewall || chains_gone.is_some() {
                return Ok(Phase {
                    links,
                    dnsmasq_gone: Some(dm),
                    chains_gone,
                    dnsmasq_end: s.dnsmasq_last,
                    ..Phase::default()
                });
            }
        }
        check_running(d, "the networks were being deleted")?;
        if t1.elapsed() >= limit {
            return Err(format!(
                "timed out after {limit:?} deleting {n} networks: links {}, {} dnsmasq \
                 left, per-network chains {}",
                if links_gone.is_some() { "gone" } else { "left" },
                s.dnsmasq_last,
                if chains_gone.is_some() || !firewall {
                    "gone"
                } else {
                    "left"
                },
            ));
        }
        next += POLL;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

/// The kernel's share: the same links and addresses made and removed with `ip -batch`
/// in a fresh namespace, without the daemon or dnsmasq (ms).
#[derive(Debug, Clone, Copy)]
struct KernelFloor {
    create: f64,
    delete: f64,
}

/// Measure [`KernelFloor`] for `n` networks: per network a VXLAN and a bridge (MTU 1450,
/// enslaved, up) and the gateway address; deleted bridge first, as the daemon does.
fn kernel_floor(n: usize) -> BenchResult<KernelFloor> {
    use std::fmt::Write as _;
    let ns = NetNs::create("dvbkern").map_err(ctx("creating a network namespace"))?;
    let (mut create, mut delete) = (String::new(), String::new());
    for i in 0..n {
        let (v, (a, b)) = (vni(i), octets(i));
        let _ = writeln!(
            create,
            "link add dvvx{v} type vxlan id {v} dstport 4789\n\
             link add dvbr{v} type bridge\n\
             link set dvvx{v} mtu 1450\n\
             link set dvbr{v} mtu 1450\n\
             link set dvvx{v} master dvbr{v}\n\
             link set dvvx{v} up\n\
             link set dvbr{v} up\n\
             addr add 10.{a}.{b}.1/24 dev dvbr{v}"
        );
        let _ = writeln!(delete, "link del dvbr{v}\nlink del dvvx{v}");
    }
    let args = ["-n", ns.name(), "-batch", "-"];
    let limit = phase_timeout(n);
    Ok(KernelFloor {
        create: timed_run("ip", &args, Some(create.as_bytes()), limit)?,
        delete: timed_run("ip", &args, Some(delete.as_bytes()), limit)?,
    })
}

// ---------------------------------------------------------------------------------------
// Figure 2: nft apply cost
// ---------------------------------------------------------------------------------------

/// Results of figure 2 (all in ms).
#[derive(Debug, Clone)]
struct NftResult {
    n: usize,
    chains: usize,
    rules: usize,
    json_bytes: usize,
    base_chains: usize,
    base_rules: usize,
    /// Building the N-network model and its JSON.
    build: Vec<f64>,
    /// The nft timings.
    t: NftTimings,
}

/// The firewall view of network `i`: 3 inbound and 2 outbound ACLs, DHCP/DNS allowed.
fn fw_network(i: usize) -> BenchResult<NetworkRules> {
    let (a, b) = octets(i);
    let cidr = |s: &str| s.parse::<Cidr>().map_err(|e| format!("{s}: {e}"));
    let net = cidr(&format!("10.{a}.{b}.0/24"))?;
    let acl = |order, action, proto, source, dest, ports: Vec<PortRange>, d: Option<&str>| Acl {
        order,
        action,
        proto: Some(proto),
        source,
        dest,
        ports,
        description: d.map(str::to_owned),
    };
    let range = "1000-2000"
        .parse::<PortRange>()
        .map_err(|e| format!("port range: {e}"))?;
    Ok(NetworkRules {
        vni: vni(i),
        bridge: format!("dvbr{}", vni(i)),
        acls_in: vec![
            acl(
                10,
                AclAction::Accept,
                AclProto::Tcp,
                Some(cidr("192.0.2.0/24")?),
                None,
                vec![PortRange::single(22)],
                Some("ssh from the admin network"),
            ),
            acl(
                20,
                AclAction::Accept,
                AclProto::Tcp,
                None,
                Some(net),
                vec![PortRange::single(80), PortRange::single(443)],
                Some("web"),
            ),
            acl(
                30,
                AclAction::Reject,
                AclProto::Udp,
                Some(cidr("10.0.0.0/8")?),
                None,
                vec![range],
                None,
            ),
        ],
        acls_out: vec![
            acl(
                10,
                AclAction::Drop,
                AclProto::Tcp,
                Some(net),
                None,
                vec![PortRange::single(25)],
                Some("no outbound smtp"),
            ),
            acl(
                20,
                AclAction::Accept,
                AclProto::Icmp,
                None,
                None,
                Vec::new(),
                None,
            ),
        ],
        default_in: AclAction::Drop,
        default_out: AclAction::Accept,
        dhcp_dns: true,
    })
}

/// Figure 2 inside a fresh namespace.
fn bench_nft(n: usize) -> BenchResult<NftResult> {
    let nets = (0..n).map(fw_network).collect::<BenchResult<Vec<_>>>()?;
    let cfg = FirewallConfig {
        enabled: true,
        ..FirewallConfig::default()
    };
    let cluster = vec!["192.0.2.0/24"
        .parse::<Cidr>()
        .map_err(|e| format!("cluster cidr: {e}"))?];
    let build = |k: usize| {
        Ruleset::from_config(&cfg, &cluster, &nets[..k])
            .map_err(|e| format!("building the ruleset with {k} networks: {e}"))
    };
    let mut build_ms = Vec::with_capacity(BUILD_REPS);
    let mut json_bytes = 0;
    for _ in 0..BUILD_REPS {
        let t = Instant::now();
        let r = build(n)?;
        json_bytes = r.to_json().map_err(|e| e.to_string())?.len();
        build_ms.push(ms(t.elapsed()));
    }
    let base = build(0)?;
    let full = build(n)?;
    let incremental = (1..=n).map(build).collect::<BenchResult<Vec<_>>>()?;
    let ns = NetNs::create("dvbnft").map_err(ctx("creating a network namespace"))?;
    let timed = ns
        .run(|| nft_sequence(&base, &full, &incremental))
        .map_err(ctx("running nft in the namespace"))??;
    Ok(NftResult {
        n,
        chains: full.chains().len(),
        rules: full.rule_count(),
        json_bytes,
        base_chains: base.chains().len(),
        base_rules: base.rule_count(),
        build: build_ms,
        t: timed,
    })
}

/// Timings of figure 2 (ms).
#[derive(Debug, Clone, Default)]
struct NftTimings {
    /// (a) one batch with all N networks, from the base ruleset.
    batch: Vec<f64>,
    /// (b) apply i (1-based) installs i networks.
    steps: Vec<f64>,
    /// (b) wall time of the whole sequence.
    steps_total: f64,
    /// (c) no-change ensure with N networks.
    ensure_full: Vec<f64>,
    /// (c) no-change ensure with the base ruleset.
    ensure_base: Vec<f64>,
    /// Plain blocking `nft -j -f -` of the N-network batch, from the base ruleset.
    raw_apply: Vec<f64>,
    /// Plain blocking `nft -j list table inet debvisor` with N networks.
    raw_list: Vec<f64>,
}

/// Run `nft args…` (feeding `stdin`, at most 30 s); returns its wall time in ms.
fn raw_nft(args: &[&str], stdin: Option<&[u8]>) -> BenchResult<f64> {
    timed_run("nft", args, stdin, Duration::from_secs(30))
}

/// Run `program args…` (feeding `stdin`), waiting with 0.2 ms polls, killing it after
/// `limit`; returns its wall time in ms.
fn timed_run(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    limit: Duration,
) -> BenchResult<f64> {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let what = format!("{program} {}", args.join(" "));
    let t = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning {what}: {e}"))?;
    let input = stdin.map(<[u8]>::to_vec);
    let pipe = child.stdin.take();
    let writer = std::thread::spawn(move || {
        if let (Some(mut p), Some(d)) = (pipe, input) {
            let _ = p.write_all(&d);
        }
    });
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut b);
            }
            b
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = t + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(200)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} timed out"));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waiting for {what}: {e}"));
            }
        }
    };
    let dt = ms(t.elapsed());
    let _ = writer.join();
    let _ = out.join();
    let stderr = err.join().unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "{what} failed with {status}: {}",
            String::from_utf8_lossy(&stderr).trim()
        ));
    }
    Ok(dt)
}

/// The measured nft sequence; runs on a thread inside the namespace (nft inherits it).
fn nft_sequence(
    base: &Ruleset,
    full: &Ruleset,
    incremental: &[Ruleset],
) -> BenchResult<NftTimings> {
    let nft = Nft::new();
    let full_json = full.to_json().map_err(|e| e.to_string())?;
    let apply = |r: &Ruleset, what: &str| -> BenchResult<f64> {
        let t = Instant::now();
        nft.apply(r).map_err(|e| format!("{what}: {e}"))?;
        Ok(ms(t.elapsed()))
    };
    let ensure = |r: &Ruleset, what: &str| -> BenchResult<f64> {
        let t = Instant::now();
        let o = nft.ensure(r).map_err(|e| format!("{what}: {e}"))?;
        let dt = ms(t.elapsed());
        if o.changed {
            return Err(format!("{what}: ensure re-applied an unchanged ruleset"));
        }
        Ok(dt)
    };
    nft.remove()
        .map_err(|e| format!("removing the table: {e}"))?;
    apply(base, "base ruleset")?;
    let ensure_base = (0..ENSURE_REPS)
        .map(|_| ensure(base, "ensure (base)"))
        .collect::<BenchResult<Vec<_>>>()?;
    // (a) one batch.
    let mut batch = Vec::with_capacity(BATCH_REPS);
    for _ in 0..BATCH_REPS {
        apply(base, "base ruleset")?;
        batch.push(apply(full, "one batch")?);
    }
    // (c) no-change ensure on the full ruleset (in force after the last batch).
    let ensure_full = (0..ENSURE_REPS)
        .map(|_| ensure(full, "ensure (full)"))
        .collect::<BenchResult<Vec<_>>>()?;
    // The same through a plain blocking nft: listing, then the batch.
    let raw_list = (0..ENSURE_REPS)
        .map(|_| raw_nft(&["-j", "list", "table", "inet", TABLE], None))
        .collect::<BenchResult<Vec<_>>>()?;
    let mut raw_apply = Vec::with_capacity(BATCH_REPS);
    for _ in 0..BATCH_REPS {
        apply(base, "base ruleset")?;
        raw_apply.push(raw_nft(&["-j", "-f", "-"], Some(full_json.as_bytes()))?);
    }
    // (b) one change per network.
    apply(base, "base ruleset")?;
    let t = Instant::now();
    let steps = incremental
        .iter()
        .enumerate()
        .map(|(i, r)| apply(r, &format!("step {}", i + 1)))
        .collect::<BenchResult<Vec<_>>>()?;
    let steps_total = ms(t.elapsed());
    nft.remove()
        .map_err(|e| format!("removing the table: {e}"))?;
    Ok(NftTimings {
        batch,
        steps,
        steps_total,
        ensure_full,
        ensure_base,
        raw_apply,
        raw_list,
    })
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

/// First line of `program --version` (or `-v`), for the report.
fn tool_version(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_owned())
        })
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| format!("{program}: unknown version"))
}

/// Milliseconds with one decimal.
fn f1(d: Duration) -> String {
    format!("{:.1}", ms(d))
}

/// A table cell of an optional duration.
fn opt(d: Option<Duration>) -> String {
    d.map_or_else(|| "n/a".into(), f1)
}

/// Median, or n/a.
fn med(xs: &[f64]) -> String {
    if xs.is_empty() {
        "n/a".into()
    } else {
        format!("{:.1}", summarize(xs).median)
    }
}

/// CPU seconds of ticks.
fn secs(ticks: u64, tck: u64) -> f64 {
    ticks as f64 / tck.max(1) as f64
}

/// The markdown section (also printed to stdout).
fn render(
    args: &Args,
    m: &Machine,
    started: &str,
    cases: &[CaseResult],
    floor: &KernelFloor,
    f: &NftResult,
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let n = args.networks;
    let _ = writeln!(o, "### Managed networks, issue 4 ({started})\n");
    let _ = writeln!(o, "- command: `{}`", bench_command(args, m));
    let _ = writeln!(o, "- machine: {m}");
    let _ = writeln!(
        o,
        "- profile: `{}` (bench and `debvisord`); {}, {}, {}\n",
        m.profile,
        tool_version("etcd", "--version"),
        tool_version("dnsmasq", "--version")
            .split("  ")
            .next()
            .unwrap_or_default(),
        tool_version("nft", "--version"),
    );

    // Figure 1.
    let _ = writeln!(
        o,
        "#### 1. Converging {n} managed networks from etcd (standalone node = primary)\n"
    );
    let _ = writeln!(
        o,
        "One fresh network namespace per column with etcd and a real `debvisord` inside \
     (keepalive and resync every {KEEPALIVE_INTERVAL}, the default). Each network \
     `10.A.B.0/24` with gateway `.1` and a DHCP range gets a VXLAN `dvvx<vni>`, a bridge \
     `dvbr<vni>`, the gateway address and its own dnsmasq. **Create**: the {n} specs are \
     written in {} transaction(s) of ≤ {TXN_MAX_OPS} puts; t = 0 just before the first; \
     *ready* = arrival of `networks/<vni>/status/{NODE}` with `\"state\":\"ready\"` on \
     a watch opened beforehand (stamped on arrival); bridges by `ip -j link show type \
     bridge` every 50 ms. **Delete**: one `networks/` prefix delete; t = 0 just before \
     it; links by `ip -j link show`, dnsmasq by `ip netns pids` + `/proc/<pid>/comm`, \
     both every 50 ms (so those rows are up to ~50 ms late), then, with the firewall, \
     per-network chains by `nft -j list chains inet` (the daemon drops a network's \
     chains after its links); the prefix delete removes the status keys itself, so \
     they are not a signal here. CPU in each phase from `/proc/<pid>/stat` (CLK_TCK \
     {}): *reaped children* are the `nft` runs and, on delete, the stopped dnsmasq \
     (their CPU inside the phase); *running dnsmasq* sums the live ones; the whole \
     machine (`/proc/stat`) includes the bench's own polling. nft figures are the \
     daemon's own `nft ruleset applied` lines (`elapsed_ms` = apply + read-back). Per-step \
     spans come from the daemon's log timestamps.\n",
        cases.first().map_or(0, |c| c.txns),
        cases.first().map_or(100, |c| c.clk_tck),
    );
    let mut hdr = String::from("| measure |");
    let mut sep = String::from("|---|");
    for c in cases {
        let _ = write!(hdr, " firewall {} |", if c.firewall { "on" } else { "off" });
        sep.push_str("---:|");
    }
    let _ = writeln!(o, "{hdr}\n{sep}");
    let row = |o: &mut String, label: &str, cell: &dyn Fn(&CaseResult) -> String| {
        let _ = write!(o, "| {label} |");
        for c in cases {
            let _ = write!(o, " {} |", cell(c));
        }
        let _ = writeln!(o);
    };
    let nf = n as f64;
    row(
        &mut o,
        "**create**: spec transactions, round trips (ms)",
        &|c| format!("{} txn, {}", c.txns, f1(c.write)),
    );
    row(&mut o, "first network ready (ms)", &|c| {
        opt(c.create.status.first().copied())
    });
    row(&mut o, "median / p90 network ready (ms)", &|c| {
        format!(
            "{} / {}",
            opt(nearest_rank(&c.create.status, 0.5)),
            opt(nearest_rank(&c.create.status, 0.9))
        )
    });
    row(&mut o, &format!("**all {n} ready (ms)**"), &|c| {
        format!("**{}**", f1(c.create_total()))
    });
    row(&mut o, "last bridge seen (ms)", &|c| f1(c.create.links));
    row(&mut o, "**per network**: all ready / N (ms)", &|c| {
        format!("**{:.1}**", ms(c.create_total()) / nf)
    });
    row(
        &mut o,
        "steady pace: (last − first ready) / (N − 1) (ms)",
        &|c| match (c.create.status.first(), c.create.status.last()) {
            (Some(a), Some(b)) if n > 1 => format!("{:.1}", ms(*b - *a) / (nf - 1.0)),
            _ => "n/a".into(),
        },
    );
    row(
        &mut o,
        "daemon log: a network's first host change → converged, median / p90 (ms)",
        &|c| {
            let s = summarize(&c.create.logs.spans);
            format!("{:.1} / {:.1}", s.median, s.p90)
        },
    );
    row(&mut o, "dnsmasq running when all ready / started", &|c| {
        format!(
            "{} / {}",
            c.create.dnsmasq_end, c.create.logs.dnsmasq_started
        )
    });
    row(
        &mut o,
        "nft applies: count / Σ elapsed / largest (ms)",
        &|c| nft_cell(&c.create.logs),
    );
    row(
        &mut o,
        "CPU (s): debvisord / its reaped children / running dnsmasq / etcd",
        &|c| cpu_cell(&c.create.cpu, c.clk_tck),
    );
    row(&mut o, "whole machine CPU busy (s, % of all CPUs)", &|c| {
        busy_cell(&c.create.cpu, c.clk_tck)
    });
    row(
        &mut o,
        "**delete**: all `dvbr*`/`dvvx*` links gone (ms)",
        &|c| f1(c.delete.links),
    );
    row(&mut o, "all dnsmasq gone (ms)", &|c| {
        opt(c.delete.dnsmasq_gone)
    });
    row(&mut o, "no per-network nft chain left (ms)", &|c| {
        c.delete.chains_gone.map_or_else(|| "-".into(), f1)
    });
    row(&mut o, "**delete converged (ms)**", &|c| {
        format!("**{}**", f1(c.delete_total()))
    });
    row(&mut o, "**per network**: delete converged / N (ms)", &|c| {
        format!("**{:.1}**", ms(c.delete_total()) / nf)
    });
    row(
        &mut o,
        "daemon log: a network's `dnsmasq stopped` → removed, median / p90 (ms)",
        &|c| {
            let s = summarize(&c.delete.logs.spans);
            format!("{:.1} / {:.1}", s.median, s.p90)
        },
    );
    row(
        &mut o,
        "nft applies: count / Σ elapsed / largest (ms)",
        &|c| nft_cell(&c.delete.logs),
    );
    row(
        &mut o,
        "CPU (s): debvisord / its reaped children / running dnsmasq / etcd",
        &|c| cpu_cell(&c.delete.cpu, c.clk_tck),
    );
    row(&mut o, "whole machine CPU busy (s, % of all CPUs)", &|c| {
        busy_cell(&c.delete.cpu, c.clk_tck)
    });
    row(
        &mut o,
        "**peak debvisord RSS**: VmHWM / max sampled (MiB)",
        &|c| {
            format!(
                "**{:.1}** / {:.1}",
                mib(c.hwm_kib),
                mib(c.rss_max_sampled_kib)
            )
        },
    );
    row(
        &mut o,
        "debvisord RSS before / all ready / after delete (MiB)",
        &|c| {
            format!(
                "{:.1} / {:.1} / {:.1}",
                mib(c.rss_before_kib),
                mib(c.rss_ready_kib),
                mib(c.rss_after_kib)
            )
        },
    );
    row(&mut o, "**dnsmasq processes at the peak**", &|c| {
        format!("**{}**", c.dnsmasq_peak)
    });
    row(
        &mut o,
        "warnings / errors logged, of which reconcile retries (create + delete)",
        &|c| {
            format!(
                "{} / {}, {}",
                c.create.logs.warnings + c.delete.logs.warnings,
                c.create.logs.errors + c.delete.logs.errors,
                c.create.logs.retries + c.delete.logs.retries
            )
        },
    );

    let _ = writeln!(
        o,
        "\n*Kernel floor*: the same {n} VXLANs and bridges (MTU, enslaved, up) and {n} \
         gateway addresses made with one `ip -batch` in a fresh namespace, without daemon \
         or dnsmasq, take {:.0} ms ({:.2} ms per network); deleting them (bridge, then \
         VXLAN) takes {:.0} ms ({:.1} ms per network).",
        floor.create,
        floor.create / nf,
        floor.delete,
        floor.delete / nf
    );

    // Figure 2.
    let b = summarize(&f.t.batch);
    let e = summarize(&f.t.ensure_full);
    let eb = summarize(&f.t.ensure_base);
    let ratio = f.t.steps_total / b.median;
    let _ = writeln!(
        o,
        "\n#### 2. nft apply cost of {} networks' chains (firewall crate, `nft -j -f -`)\n",
        f.n
    );
    let _ = writeln!(
        o,
        "`Ruleset::from_config` with `enabled: true`, one cluster prefix and {} networks, \
     each with 3 inbound ACLs (TCP 22 from a prefix, TCP 80+443 to the network, UDP \
     1000–2000 reject from 10/8), 2 outbound ACLs (TCP 25 drop, ICMP accept) and \
     DHCP/DNS allowed: {} chains, {} rules, {} bytes of nft JSON (the base ruleset alone: \
     {} chains, {} rules). `Nft::apply` (one `nft -j -f -` transaction replacing the \
     table, then `nft -j list table` read back and compared) in a fresh namespace; nft \
     is forked from a thread inside it, like the daemon's, so no `ip netns exec`.\n",
        f.n, f.chains, f.rules, f.json_bytes, f.base_chains, f.base_rules
    );
    let _ = writeln!(o, "| measure | ms |");
    let _ = writeln!(o, "|---|---:|");
    let _ = writeln!(
        o,
        "| building the model and its JSON, median of {BUILD_REPS} | {} |",
        med(&f.build)
    );
    let _ = writeln!(
        o,
        "| **(a) one batch**: apply with all {} networks over the base ruleset, median of \
     {BATCH_REPS} (min–max) | **{:.1}** ({:.1}–{:.1}) |",
        f.n, b.median, b.min, b.max
    );
    let st = summarize(&f.t.steps);
    let _ = writeln!(
        o,
        "| **(b) one change per network**: {} applies with 1, 2, …, {} networks, total | \
     **{:.1}** |",
        f.n, f.n, f.t.steps_total
    );
    let _ = writeln!(
        o,
        "| (b) first / median / last apply | {:.1} / {:.1} / {:.1} |",
        f.t.steps.first().copied().unwrap_or(f64::NAN),
        st.median,
        f.t.steps.last().copied().unwrap_or(f64::NAN)
    );
    let _ = writeln!(o, "| **ratio (b)/(a)** | **{ratio:.0}×** |");
    let _ = writeln!(
        o,
        "| **(c) `ensure`, no change**, {} networks, median of {ENSURE_REPS} (min–max) | \
     **{:.1}** ({:.1}–{:.1}) |",
        f.n, e.median, e.min, e.max
    );
    let _ = writeln!(
        o,
        "| (c) `ensure`, no change, base ruleset (no network), median of {ENSURE_REPS} | \
         {:.1} |",
        eb.median
    );
    let _ = writeln!(
        o,
        "| for comparison, plain blocking `nft -j -f -` of the (a) batch, median of \
         {BATCH_REPS} | {} |",
        med(&f.t.raw_apply)
    );
    let _ = writeln!(
        o,
        "| for comparison, plain blocking `nft -j list table inet {TABLE}` with {} \
         networks, median of {ENSURE_REPS} | {} |",
        f.n,
        med(&f.t.raw_list)
    );

    // What it means.
    let off = cases.iter().find(|c| !c.firewall);
    let on = cases.iter().find(|c| c.firewall);
    if let (Some(off), Some(on)) = (off, on) {
        let t = |d: Duration| ms(d) / 1000.0;
        let busy = |p: &PhaseCpu| 100.0 * p.machine_busy as f64 / p.machine_total.max(1) as f64;
        let nft_on: f64 = on.create.logs.nft_ms.iter().sum();
        let _ = writeln!(
            o,
            "\n**What this means for an operator.** On this machine ({} CPUs) the daemon \
             converges a burst of {n} new managed networks in {:.1} s with the firewall \
             off, **{:.0} ms per network**, and in {:.1} s with it on, **{:.0} ms per \
             network**; removing them takes {:.1} s / {:.1} s ({:.0} / {:.0} ms per \
             network). Creating is almost all user-space work — the kernel makes the same \
             links and addresses in {:.0} ms — shared between the daemon ({:.1} s of CPU), \
             the {n} dnsmasq processes ({:.1} s, each reacting to every link and address \
             change of the namespace) and waiting; the whole machine was {:.0} % busy over \
             the phase (a shared VM: that includes other work on it). Deleting \
             is bounded by the kernel's link teardown ({:.1} s for the same links without \
             the daemon). With the firewall on, the daemon re-applies the whole table \
             once per burst of changes (100 ms settle): {} applies and {:.1} s of nft wall \
             time during the burst; measured directly, one apply per network would cost \
             **{:.0}× one batch** ({:.1} s against {:.0} ms), which is why changes are \
             coalesced; the firewall adds {:.1} s to the burst. In steady \
             state each resync tick (every {KEEPALIVE_INTERVAL}) spends **{:.0} ms** on \
             the no-change `ensure` with {} networks ({:.0} ms with none). Peak RSS of \
             `debvisord` was {:.1} MiB with the firewall off and {:.1} MiB with it on; \
             {} dnsmasq processes ran at the peak.",
            m.nproc,
            t(off.create_total()),
            ms(off.create_total()) / nf,
            t(on.create_total()),
            ms(on.create_total()) / nf,
            t(off.delete_total()),
            t(on.delete_total()),
            ms(off.delete_total()) / nf,
            ms(on.delete_total()) / nf,
            floor.create,
            secs(off.create.cpu.daemon, off.clk_tck),
            secs(off.create.cpu.dnsmasq_live, off.clk_tck),
            busy(&off.create.cpu),
            floor.delete / 1000.0,
            on.create.logs.nft_ms.len(),
            nft_on / 1000.0,
            ratio,
            f.t.steps_total / 1000.0,
            b.median,
            (t(on.create_total()) - t(off.create_total())).max(0.0),
            e.median,
            f.n,
            eb.median,
            mib(off.hwm_kib),
            mib(on.hwm_kib),
            on.dnsmasq_peak.max(off.dnsmasq_peak),
        );
    }
    let _ = writeln!(
        o,
        "\nThe issue gives no target for these figures: they are reported, not judged."
    );
    o
}

/// `daemon / reaped / live dnsmasq / etcd` CPU seconds.
fn cpu_cell(p: &PhaseCpu, tck: u64) -> String {
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2}",
        secs(p.daemon, tck),
        secs(p.reaped, tck),
        secs(p.dnsmasq_live, tck),
        secs(p.etcd, tck)
    )
}

/// Busy CPU seconds of the machine and their share of its capacity.
fn busy_cell(p: &PhaseCpu, tck: u64) -> String {
    if p.machine_total == 0 {
        return "n/a".into();
    }
    format!(
        "{:.2} ({:.0} %)",
        secs(p.machine_busy, tck),
        100.0 * p.machine_busy as f64 / p.machine_total as f64
    )
}

/// `count / Σ elapsed / largest` of the nft apply lines.
fn nft_cell(l: &LogStats) -> String {
    if l.nft_ms.is_empty() {
        return "0 / - / -".into();
    }
    let sum: f64 = l.nft_ms.iter().sum();
    let max = l.nft_ms.iter().copied().fold(f64::MIN, f64::max);
    format!("{} / {sum:.0} / {max:.0}", l.nft_ms.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_keys_and_specs() {
        assert_eq!(
            status_vni("/debvisor/networks/1007/status/bench-net"),
            Some(1007)
        );
        assert_eq!(status_vni("/debvisor/networks/1007/status/other"), None);
        assert_eq!(status_vni("/debvisor/networks/1007/spec"), None);
        let s: Value = serde_json::from_str(&spec(257)).expect("spec JSON");
        assert_eq!(s["ipv4"]["network"], "10.101.1.0/24");
        assert_eq!(s["dhcp4"]["end"], "10.101.1.200");
        assert_eq!(octets(MAX_NETWORKS - 1), (109, 255));
    }

    #[test]
    fn log_spans_and_nft_lines() {
        let lines: Vec<String> = [
        r#"{"timestamp":"2026-11-23T15:00:00.000Z","level":"INFO","message":"network host change","network":1000}"#,
        r#"{"timestamp":"2026-11-23T15:00:00.010Z","level":"INFO","message":"nft ruleset applied","elapsed_ms":7}"#,
        r#"{"timestamp":"2026-11-23T15:00:00.025Z","level":"WARN","message":"network converged on this host","network":1000}"#,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
        let l = LogStats::parse(
            &lines,
            "network host change",
            "network converged on this host",
        );
        assert_eq!(l.spans, vec![25.0]);
        assert_eq!(l.nft_ms, vec![7.0]);
        assert_eq!(l.warnings, 1);
    }

    #[test]
    fn acl_model_builds() {
        let nets: Vec<NetworkRules> = (0..3).map(|i| fw_network(i).expect("net")).collect();
        let r = Ruleset::from_config(
            &FirewallConfig {
                enabled: true,
                ..FirewallConfig::default()
            },
            &[],
            &nets,
        )
        .expect("ruleset");
        assert!(r.chain("net1002-in").is_some());
    }
}
