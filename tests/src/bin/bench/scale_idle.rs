//! `--scale` (issue 17): what idle VMs cost a node in steady state — etcd history (key
//! versions written per hour) and the daemon's CPU per keepalive tick — at 0, 100 and 1000
//! VMs on libvirt's test driver.
//!
//! Per VM count: a fresh etcd and a fresh `debvisord` at the shipped keepalive interval
//! (5 s, lease TTL 15 s), the VMs written as `vms.rs` writes them and waited for until every
//! status says `running`, then a settle period long enough for every VM's first stats write
//! ([`settle`]), then an idle window of `--ticks` keepalive intervals. Over the window:
//! etcd's `etcd_mvcc_put_total` + `etcd_mvcc_delete_total` (key versions) and its revision
//! (transactions), scaled to an hour; the events a watch of `vms/` (what every node's VM
//! reactor watches) receives; the daemon's and etcd's CPU from `/proc/<pid>/stat`.
//!
//! `--scale-baseline PATH` runs the same figures first with another `debvisord` (e.g. one
//! built from the previous commit) and reports both side by side. `--scale-tick S`
//! (repeatable) measures at other keepalive intervals, one table each (the idle window is
//! `--ticks` × 5 s at any interval); `--scale-keepalive-only` adds this build with the
//! stats sampler and the full VM resync at 10 minutes, so the keepalive tick path's own
//! cost is shown apart from the O(VMs) work on their own intervals.
//!
//! `--scale-kvm N` runs the same figures (same variants, ticks and window) with the daemon
//! on `qemu:///system` and 0, then N real KVM guests (the harness' tiny guest: 64 MiB,
//! 1 vCPU, no disk) instead of the test driver's 0, 100 and 1000 VMs: one [`measure`] for
//! both, given the libvirt URI and the guest maker ([`Guests`]). Its report goes between
//! the `bench:scale-kvm` markers.
//!
//! Every etcd and daemon is owned by a local (killed on drop, on every return path); every
//! real guest by a [`TestDomain`] guard (destroyed and undefined on drop, after the daemon
//! was killed so it cannot start it again; named `dvtest-<pid>-…` so [`sweep_stale`] removes
//! those of a killed run). SIGINT/SIGTERM end every wait through those drops.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use debvisor_daemon::hypervisor::Libvirt;
use debvisor_tests::libvirt::{ensure_libvirtd, sweep_stale, TestDomain, QEMU_URI, TEST_URI};
use debvisor_tests::{free_port, DaemonBuilder, DaemonProcess, EtcdProcess};
use etcd_client::WatchOptions;

use super::clock::now_utc_string;
use super::host::{clk_tck, cpu_ticks, load_triple};
use super::report::{bench_command, publish, Machine};
use super::scale::{check_interrupted, install_signal_handlers};
use super::stats::verdict;
use super::ticks::{fetch_metrics, Metrics};
use super::vms::{connect, put_vms, StatusWatch, VmSpec, PHASE_BASE, PHASE_PER_VM};
use crate::{Args, BenchResult};

/// Start marker of the generated section in `docs/benchmarks.md`.
const MARK_START: &str = "<!-- bench:scale-idle:start -->";
/// End marker of the generated section in `docs/benchmarks.md`.
const MARK_END: &str = "<!-- bench:scale-idle:end -->";
/// Start marker of the real-guest (`--scale-kvm`) section in `docs/benchmarks.md`.
const KVM_MARK_START: &str = "<!-- bench:scale-kvm:start -->";
/// End marker of the real-guest section in `docs/benchmarks.md`.
const KVM_MARK_END: &str = "<!-- bench:scale-kvm:end -->";
/// The VM counts measured on the test driver.
const SIZES: [usize; 3] = [0, 100, 1000];
/// Most real guests `--scale-kvm` accepts (64 MiB each, plus qemu's own memory).
pub(crate) const MAX_KVM_GUESTS: usize = 64;
/// Label in the real guests' names (`dvtest-<pid>-<n>-scalekvm`).
const KVM_LABEL: &str = "scalekvm";
/// Time a real guest may take to report `running`, per guest, on top of [`PHASE_BASE`]
/// (qemu's start on a loaded 2-core machine, not the test driver's 50 ms).
const KVM_PER_GUEST: Duration = Duration::from_secs(3);
/// Poll period of the interruptible sleeps (SIGINT/SIGTERM, daemon alive).
const POLL: Duration = Duration::from_secs(1);
/// The keepalive interval of the targets; the idle window is `--ticks` of these.
const TICK: Duration = Duration::from_secs(5);
/// Sampler and full-resync interval of the `--scale-keepalive-only` variant: longer than
/// any window, so neither runs inside it.
const QUIET: &str = "10m";
/// The lease TTL in keepalive intervals (the shipped 2 s / 6 s, and 5 s / 15 s).
const TTL_TICKS: u32 = 3;
/// The daemon's default `domains.stats_writes_per_tick`.
const STATS_BUDGET: usize = 64;
/// The longest of the keepalive interval and the shipped `domains.stats_sample_interval`:
/// one round of first stats writes takes at most this long on either build.
const STATS_ROUND: Duration = Duration::from_secs(10);
/// How long a daemon may take to reach `run`.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Target: at most this many key versions per hour above the 0-VM figure with N idle VMs
/// (one a minute: the O(1) part is the same at every N, idle VMs add nothing).
const TARGET_EXTRA_VERSIONS_PER_HOUR: f64 = 60.0;
/// Target: daemon CPU at 1000 idle VMs, % of one core at the 5 s tick.
const TARGET_CPU_PCT: f64 = 1.0;
/// Node of the daemon.
const NODE: &str = "bench-scale";
/// Prefix every node's VM reactor watches.
const VMS_PREFIX: &str = "/debvisor/vms/";

/// Where the measured VMs run: the libvirt URI the daemon drives and how its VMs are made.
enum Guests {
    /// libvirt's test driver inside the daemon (its VMs go with the daemon): 0, 100, 1000.
    TestDriver,
    /// Real KVM guests on the system libvirtd: 0, then `n`.
    Kvm {
        /// The bench's own connection, which the guests' guards remove them through.
        lv: Libvirt,
        /// Guests of the second count (`--scale-kvm`).
        n: usize,
        /// Domains on that libvirtd that are not the bench's, at the start (the daemon
        /// lists them too, as foreign).
        others: usize,
    },
}

impl Guests {
    /// Real guests when `--scale-kvm` asks (root, KVM, the system libvirtd answering, stale
    /// test guests swept), else the test driver.
    fn from_args(args: &Args, rt: &tokio::runtime::Runtime) -> BenchResult<Guests> {
        let Some(n) = args.scale_kvm else {
            return Ok(Guests::TestDriver);
        };
        if !debvisor_tests::is_root() {
            return Err("--scale-kvm: qemu:///system needs root".into());
        }
        if !debvisor_tests::kvm_available() {
            return Err("--scale-kvm: no usable /dev/kvm: the figures are about KVM guests".into());
        }
        ensure_libvirtd().map_err(|e| format!("--scale-kvm: libvirtd: {e}"))?;
        let lv = Libvirt::new(QEMU_URI, Duration::from_secs(20));
        rt.block_on(sweep_stale(&lv));
        let others = rt
            .block_on(lv.list())
            .map_err(|e| format!("--scale-kvm: {QEMU_URI}: {e}"))?
            .len();
        Ok(Guests::Kvm { lv, n, others })
    }

    /// The daemon's `DEBVISOR_HYPERVISOR_URI`.
    fn uri(&self) -> &'static str {
        match self {
            Guests::TestDriver => TEST_URI,
            Guests::Kvm { .. } => QEMU_URI,
        }
    }

    /// The VM counts measured, 0 first.
    fn sizes(&self) -> Vec<usize> {
        match self {
            Guests::TestDriver => SIZES.to_vec(),
            Guests::Kvm { n, .. } => vec![0, *n],
        }
    }

    /// What the report calls them: plural, singular.
    fn noun(&self) -> (&'static str, &'static str) {
        match self {
            Guests::TestDriver => ("VMs", "VM"),
            Guests::Kvm { .. } => ("KVM guests", "guest"),
        }
    }

    /// How long `n` of them may take to report `running`.
    fn start_timeout(&self, n: usize) -> Duration {
        let per = match self {
            Guests::TestDriver => PHASE_PER_VM,
            Guests::Kvm { .. } => KVM_PER_GUEST,
        };
        PHASE_BASE + per * n as u32
    }

    /// `n` VMs to write, and the guards that remove them from libvirt when dropped (none
    /// on the test driver).
    fn make(&self, n: usize) -> (Vec<VmSpec>, Vec<TestDomain>) {
        match self {
            Guests::TestDriver => ((0..n).map(|_| VmSpec::test_driver()).collect(), Vec::new()),
            Guests::Kvm { lv, .. } => {
                let guards: Vec<TestDomain> =
                    (0..n).map(|_| TestDomain::new(lv, KVM_LABEL)).collect();
                (guards.iter().map(VmSpec::of_domain).collect(), guards)
            }
        }
    }

    /// The report's words on where the VMs ran.
    fn describe(&self) -> String {
        match self {
            Guests::TestDriver => format!("VMs on libvirt `{TEST_URI}`"),
            Guests::Kvm { n, others, .. } => format!(
                "0, then {n} real KVM guests on `{QEMU_URI}` (the harness' tiny guest: 64 MiB, \
                 1 vCPU, no disk, its firmware idling with nothing to boot; named \
                 `dvtest-<pid>-<n>-{KVM_LABEL}`) written through etcd like the VMs of the \
                 test-driver table; {others} other domains on that libvirtd at the start \
                 (the daemon lists them too)"
            ),
        }
    }

    /// The report's markers in `docs/benchmarks.md`.
    fn marks(&self) -> (&'static str, &'static str) {
        match self {
            Guests::TestDriver => (MARK_START, MARK_END),
            Guests::Kvm { .. } => (KVM_MARK_START, KVM_MARK_END),
        }
    }
}

/// Sleep `d` in [`POLL`] steps; fails on SIGINT/SIGTERM or when the daemon exited.
fn sleep_checked(d: Duration, daemon: &mut DaemonProcess) -> BenchResult<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        if !daemon.is_running() {
            return Err(format!("debvisord exited\n{}", daemon.tail(40)));
        }
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(POLL));
    }
}

/// Wait after the VMs run before the window: ⌈N / budget⌉ + 2 rounds of first stats
/// writes (10 s each), 10 s with no VM.
fn settle(n: usize) -> Duration {
    if n == 0 {
        STATS_ROUND
    } else {
        STATS_ROUND * (n.div_ceil(STATS_BUDGET) + 2) as u32
    }
}

/// The figures of one VM count on one build.
#[derive(Debug, Clone)]
struct Idle {
    vms: usize,
    /// The keepalive interval of this run.
    tick: Duration,
    window: Duration,
    /// Key versions (puts + deletes) over the window.
    versions: f64,
    /// Revisions (committed transactions) over the window.
    revisions: f64,
    /// Events a watch of `vms/` received over the window, and of those on `…/stats`.
    vm_events: u64,
    vm_stats_events: u64,
    /// Daemon and etcd CPU ticks over the window.
    cpu_ticks: u64,
    etcd_ticks: u64,
    clk_tck: u64,
}

impl Idle {
    fn per_hour(&self, x: f64) -> f64 {
        x * 3600.0 / self.window.as_secs_f64()
    }

    /// Daemon CPU per keepalive tick (ms).
    fn cpu_ms_per_tick(&self) -> f64 {
        let ticks = self.window.as_secs_f64() / self.tick.as_secs_f64();
        self.cpu_ticks as f64 * 1000.0 / self.clk_tck as f64 / ticks
    }

    /// Daemon CPU, % of one core.
    fn cpu_pct(&self) -> f64 {
        self.cpu_ticks as f64 * 100.0 / self.clk_tck as f64 / self.window.as_secs_f64()
    }

    /// etcd CPU, % of one core.
    fn etcd_pct(&self) -> f64 {
        self.etcd_ticks as f64 * 100.0 / self.clk_tck as f64 / self.window.as_secs_f64()
    }
}

/// One daemon configuration measured at 0, 100 and 1000 VMs.
#[derive(Debug, Clone)]
struct Variant {
    /// "baseline" or "this build".
    label: String,
    bin: PathBuf,
    tick: Duration,
    /// Extra `DEBVISOR_*` settings of the daemon.
    env: Vec<(&'static str, &'static str)>,
}

/// The tables of a report: one per keepalive interval (baseline and this build side by
/// side), then the keepalive-only variant when asked.
fn plan(args: &Args, current: &Path) -> Vec<(String, Vec<Variant>)> {
    let ticks: Vec<u64> = if args.scale_ticks.is_empty() {
        vec![TICK.as_secs()]
    } else {
        args.scale_ticks.clone()
    };
    let mut tables = Vec::new();
    for t in &ticks {
        let tick = Duration::from_secs(*t);
        let mut vs = Vec::new();
        if let Some(b) = &args.scale_baseline {
            vs.push(Variant {
                label: "baseline".into(),
                bin: b.clone(),
                tick,
                env: Vec::new(),
            });
        }
        vs.push(Variant {
            label: "this build".into(),
            bin: current.to_path_buf(),
            tick,
            env: Vec::new(),
        });
        tables.push((
            format!("keepalive every {t}s, shipped sampler (10s) and full resync (30s)"),
            vs,
        ));
    }
    if args.scale_keepalive_only {
        let tick = Duration::from_secs(ticks[0]);
        tables.push((
            format!(
                "keepalive every {}s, this build with the stats sampler and the full VM resync at {QUIET} (the tick path alone)",
                ticks[0]
            ),
            vec![Variant {
                label: "this build, tick path".into(),
                bin: current.to_path_buf(),
                tick,
                env: vec![
                    ("DEBVISOR_DOMAINS_STATS_SAMPLE_INTERVAL", QUIET),
                    // May not be shorter than the sample interval.
                    ("DEBVISOR_DOMAINS_STATS_WRITE_INTERVAL", QUIET),
                    ("DEBVISOR_DOMAINS_RESYNC_INTERVAL", QUIET),
                ],
            }],
        ));
    }
    tables
}

/// The figures of one table: each variant with its runs.
type Table = (String, Vec<(Variant, Vec<Idle>)>);

/// Run the figures (baseline first when asked) and publish them.
pub(crate) fn run(args: &Args, machine: &Machine) -> BenchResult<()> {
    install_signal_handlers();
    let started = now_utc_string();
    let load0 = load_triple();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("building a tokio runtime: {e}"))?;
    let guests = Guests::from_args(args, &rt)?;
    let window = TICK * args.ticks as u32;
    let current = debvisor_tests::bin_path("debvisord");
    let mut results: Vec<Table> = Vec::new();
    for (title, variants) in plan(args, &current) {
        let mut table = Vec::new();
        for v in variants {
            let mut per = Vec::new();
            for n in guests.sizes() {
                eprintln!(
                    "debvisor-bench: [scale] {} ({}, tick {:?}{}): {n} {} on {}, settle {:?}, window {window:?}",
                    v.label,
                    v.bin.display(),
                    v.tick,
                    if v.env.is_empty() { "" } else { ", quiet sampler and resync" },
                    guests.noun().0,
                    guests.uri(),
                    settle(n)
                );
                per.push(measure(&rt, &v, &guests, n, window)?);
            }
            table.push((v, per));
        }
        results.push((title, table));
    }
    let load1 = load_triple();
    rt.shutdown_timeout(Duration::from_secs(5));
    let report = render(args, machine, &guests, &started, (&load0, &load1), &results);
    let (start, end) = guests.marks();
    publish(args, start, end, &report)
}

/// Spawn the daemon of `v` at its tick against `etcd`, on `guests`' libvirt, and wait for
/// `run`.
fn spawn(etcd: &EtcdProcess, v: &Variant, guests: &Guests) -> BenchResult<DaemonProcess> {
    let bin = &v.bin;
    let mut b = DaemonBuilder::new(NODE)
        .endpoints(&[etcd.endpoint()])
        .binary(bin)
        .env("DEBVISOR_HYPERVISOR_URI", guests.uri())
        // Its own port: another bench's daemon on the shipped one must not take it away
        // (the daemon goes on without /metrics, which would not be the same daemon).
        .env(
            "DEBVISOR_METRICS_LISTEN",
            &format!("127.0.0.1:{}", free_port()),
        )
        .env(
            "DEBVISOR_KEEPALIVE_INTERVAL",
            &format!("{}s", v.tick.as_secs()),
        )
        .env(
            "DEBVISOR_KEEPALIVE_LEASE_TTL",
            &format!("{}s", (v.tick * TTL_TICKS).as_secs()),
        );
    for (k, val) in &v.env {
        b = b.env(k, val);
    }
    let mut d = b
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
    d.wait_run(RUN_TIMEOUT)
        .map_err(|e| format!("{} did not reach run: {e}", bin.display()))?;
    Ok(d)
}

/// Counts of a watch of `vms/`: every event, and those on a `/stats` key.
#[derive(Default)]
struct EventCount {
    all: AtomicU64,
    stats: AtomicU64,
}

/// Watch `vms/` on `etcd` and count its events until aborted; resolves once created.
fn watch_vms(
    rt: &tokio::runtime::Runtime,
    etcd: &EtcdProcess,
    counts: Arc<EventCount>,
) -> BenchResult<tokio::task::JoinHandle<()>> {
    let mut client = rt.block_on(connect(etcd))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let task = rt.spawn(async move {
        let mut s = match client
            .watch(VMS_PREFIX, Some(WatchOptions::new().with_prefix()))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let _ = ready_tx.send(Err(format!("watching {VMS_PREFIX}: {e}")));
                return;
            }
        };
        while let Ok(Some(msg)) = s.message().await {
            if msg.created() {
                let _ = ready_tx.send(Ok(()));
            }
            for ev in msg.events() {
                counts.all.fetch_add(1, Ordering::Relaxed);
                if ev.kv().is_some_and(|kv| kv.key().ends_with(b"/stats")) {
                    counts.stats.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(task),
        Ok(Err(e)) => {
            task.abort();
            Err(e)
        }
        Err(_) => {
            task.abort();
            Err("the vms/ watch was not created within 10 s".into())
        }
    }
}

/// Key versions (puts + deletes) in a `/metrics` snapshot.
fn versions(m: &Metrics) -> BenchResult<f64> {
    let puts = m
        .sum("etcd_mvcc_put_total", &[])
        .ok_or("etcd /metrics has no etcd_mvcc_put_total")?;
    Ok(puts + m.sum("etcd_mvcc_delete_total", &[]).unwrap_or(0.0))
}

/// The store revision in a `/metrics` snapshot.
fn revision(m: &Metrics) -> BenchResult<f64> {
    m.sum("etcd_debugging_mvcc_current_revision", &[])
        .ok_or_else(|| "etcd /metrics has no etcd_debugging_mvcc_current_revision".into())
}

/// One VM count on one build: fresh etcd and daemon, `n` of `guests` running, settle,
/// idle window.
fn measure(
    rt: &tokio::runtime::Runtime,
    v: &Variant,
    guests: &Guests,
    n: usize,
    window: Duration,
) -> BenchResult<Idle> {
    let etcd = EtcdProcess::start().map_err(|e| format!("starting etcd: {e}"))?;
    // The guards are declared before the daemon, so even a panic drops (kills) the daemon
    // first: it cannot start a guest again once its guard removed it.
    let (vms, guards) = guests.make(n);
    let mut d = spawn(&etcd, v, guests)?;
    let r = idle(rt, &etcd, &mut d, guests, &vms, v.tick, window);
    // SIGKILL: the daemon stops nothing on its way out; the guards remove the guests.
    let _ = d.kill();
    drop(guards);
    r
}

/// The VMs `vms` written for `d` and waited for until every status says `running`, the
/// settle period, then the idle window's figures.
fn idle(
    rt: &tokio::runtime::Runtime,
    etcd: &EtcdProcess,
    d: &mut DaemonProcess,
    guests: &Guests,
    vms: &[VmSpec],
    tick: Duration,
    window: Duration,
) -> BenchResult<Idle> {
    let tck = clk_tck()?;
    let etcd_pid = etcd.pid().ok_or("etcd is not running")?;
    let n = vms.len();
    if n > 0 {
        let watch = StatusWatch::start(rt, etcd)?;
        let mut client = rt.block_on(connect(etcd))?;
        rt.block_on(put_vms(&mut client, vms, NODE))?;
        let want: HashSet<String> = vms.iter().map(|v| v.uuid.clone()).collect();
        watch.wait_all(&want, d, guests.start_timeout(n))?;
    }
    sleep_checked(settle(n), d)?;
    let counts = Arc::new(EventCount::default());
    let watcher = watch_vms(rt, etcd, counts.clone())?;
    let pid = d.pid();
    let m0 = fetch_metrics(etcd.client_addr())?;
    let (a0, s0) = (
        counts.all.load(Ordering::Relaxed),
        counts.stats.load(Ordering::Relaxed),
    );
    let c0 = cpu_ticks(pid)?;
    let e0 = cpu_ticks(etcd_pid)?;
    let t0 = Instant::now();
    if let Err(e) = sleep_checked(window, d) {
        watcher.abort();
        return Err(format!("during the idle window: {e}"));
    }
    let c1 = cpu_ticks(pid)?;
    let e1 = cpu_ticks(etcd_pid)?;
    let m1 = fetch_metrics(etcd.client_addr())?;
    let spent = t0.elapsed();
    // Events of the window's last writes are in flight for a moment.
    std::thread::sleep(Duration::from_millis(200));
    let (a1, s1) = (
        counts.all.load(Ordering::Relaxed),
        counts.stats.load(Ordering::Relaxed),
    );
    watcher.abort();
    if !d.is_running() {
        return Err(format!(
            "debvisord exited during the idle window\n{}",
            d.tail(40)
        ));
    }
    Ok(Idle {
        vms: n,
        tick,
        window: spent,
        versions: versions(&m1)? - versions(&m0)?,
        revisions: revision(&m1)? - revision(&m0)?,
        vm_events: a1 - a0,
        vm_stats_events: s1 - s0,
        cpu_ticks: c1.saturating_sub(c0),
        etcd_ticks: e1.saturating_sub(e0),
        clk_tck: tck,
    })
}

/// The verdicts of one build: (etcd history, keepalive CPU, flat per tick).
fn verdicts(per: &[Idle]) -> (bool, bool, bool) {
    let base = per.iter().find(|r| r.vms == 0);
    let big = per.iter().max_by_key(|r| r.vms);
    match (base, big) {
        (Some(b), Some(g)) => {
            let extra = g.per_hour(g.versions) - b.per_hour(b.versions);
            (
                extra <= TARGET_EXTRA_VERSIONS_PER_HOUR,
                g.cpu_pct() <= TARGET_CPU_PCT,
                // Flat: the largest count's tick (1000 VMs, or the N real guests) within
                // 1 ms (or 50 %) of the empty one.
                g.cpu_ms_per_tick() <= (b.cpu_ms_per_tick() * 1.5).max(b.cpu_ms_per_tick() + 1.0),
            )
        }
        _ => (false, false, false),
    }
}

fn render(
    args: &Args,
    machine: &Machine,
    guests: &Guests,
    started: &str,
    load: (&str, &str),
    results: &[Table],
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let (plural, singular) = guests.noun();
    let _ = writeln!(o, "#### Idle {plural}: measured ({started})\n");
    let _ = writeln!(o, "- command: `{}`", bench_command(args, machine));
    let _ = writeln!(
        o,
        "- machine: {} CPUs (`nproc`), {}, kernel {}, {} RAM",
        machine.nproc, machine.cpu_model, machine.kernel, machine.mem_total
    );
    let _ = writeln!(
        o,
        "- profile: `{}`; etcd 3.4 on loopback, a fresh etcd and `debvisord` per {singular} \
         count, lease TTL 3 × the keepalive interval (the shipped ratio), {}; settle after \
         every {singular} ran: (⌈N / {STATS_BUDGET}⌉ + 2) × {}s; idle window {} × {}s; load \
         average at the start {}, at the end {}",
        machine.profile,
        guests.describe(),
        STATS_ROUND.as_secs(),
        args.ticks,
        TICK.as_secs(),
        load.0,
        load.1
    );
    let mut bins: Vec<(&str, &Path)> = Vec::new();
    for (_, table) in results {
        for (v, _) in table {
            if !bins.iter().any(|(l, _)| *l == v.label.as_str()) {
                bins.push((v.label.as_str(), v.bin.as_path()));
            }
        }
    }
    for (label, bin) in bins {
        let _ = writeln!(o, "- {label}: `{}`", bin.display());
    }
    for (title, table) in results {
        let _ = writeln!(o);
        render_table(&mut o, title, table, guests.noun());
    }
    let _ = writeln!(
        o,
        "\n*Key versions*: the window's delta of etcd's `etcd_mvcc_put_total` + \
         `etcd_mvcc_delete_total` (every put in a transaction is one version kept in the \
         history until compaction), scaled to an hour; *revisions* count transactions. \
         *Daemon CPU per tick*: utime + stime over the window divided by the window's \
         keepalive intervals — everything the idle daemon does: the keepalive tick path \
         (keepalive, fence check, drain pass, firewall and client-network checks), and \
         amortised over the ticks the stats sample (every 10 s) and the full VM resync (the \
         baseline: every tick; this build: every 30 s) unless the table says otherwise. \
         `/proc` counts in 10 ms steps."
    );
    if let Guests::Kvm { .. } = guests {
        let _ = writeln!(
            o,
            "\nThe guests' qemu processes are not the daemon's and are not counted; unlike the \
             test driver they have real CPU counters, so a guest's stats record can be \
             written inside the window (the key-versions row shows it)."
        );
    }
    o
}

/// One table: the figures of each variant side by side, then the verdicts; `noun` names
/// the VMs (plural, singular).
fn render_table(
    o: &mut String,
    title: &str,
    table: &[(Variant, Vec<Idle>)],
    (plural, singular): (&str, &str),
) {
    use std::fmt::Write as _;
    let _ = writeln!(o, "**{title}**\n");
    let mut head = String::from("| per node, idle |");
    let mut sep = String::from("|---|");
    for (v, per) in table {
        for r in per {
            let _ = write!(head, " {}, {} {plural} |", v.label, r.vms);
            sep.push_str("---:|");
        }
    }
    let _ = writeln!(o, "{head}\n{sep}");
    type Row = (&'static str, fn(&Idle) -> String);
    let rows: [Row; 8] = [
        ("**key versions written per hour**", |r| {
            format!("**{:.0}**", r.per_hour(r.versions))
        }),
        ("revisions (transactions) per hour", |r| {
            format!("{:.0}", r.per_hour(r.revisions))
        }),
        ("events a `vms/` watch receives per hour", |r| {
            format!("{:.0}", r.per_hour(r.vm_events as f64))
        }),
        ("of which `…/stats`", |r| {
            format!("{:.0}", r.per_hour(r.vm_stats_events as f64))
        }),
        ("**daemon CPU per keepalive tick (ms)**", |r| {
            format!("**{:.2}**", r.cpu_ms_per_tick())
        }),
        ("daemon CPU (% of one core)", |r| {
            format!("{:.2}", r.cpu_pct())
        }),
        ("etcd CPU (% of one core)", |r| {
            format!("{:.2}", r.etcd_pct())
        }),
        ("window (s)", |r| format!("{:.1}", r.window.as_secs_f64())),
    ];
    for (name, f) in rows {
        let mut line = format!("| {name} |");
        for (_, per) in table {
            for r in per {
                let _ = write!(line, " {} |", f(r));
            }
        }
        let _ = writeln!(o, "{line}");
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "| target | {} |\n|---|{}",
        table
            .iter()
            .map(|(v, _)| v.label.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(table.len())
    );
    let tick = table
        .first()
        .map(|(v, _)| v.tick.as_secs())
        .unwrap_or_default();
    let big = table
        .iter()
        .flat_map(|(_, per)| per.iter().map(|r| r.vms))
        .max()
        .unwrap_or_default();
    let mut hist = format!("| etcd history: {big} idle {plural} add ≤ 60 key versions/h |");
    let mut cpu = format!("| keepalive CPU: {big} idle {plural} ≤ 1 % of a core at {tick} s |");
    let mut flat = format!(
        "| keepalive CPU flat: {big}-{singular} tick ≤ max(1.5×, +1 ms) of the empty tick |"
    );
    for (_, per) in table {
        let (h, c, f) = verdicts(per);
        let _ = write!(hist, " {} |", verdict(h));
        let _ = write!(cpu, " {} |", verdict(c));
        let _ = write!(flat, " {} |", verdict(f));
    }
    let _ = writeln!(o, "{hist}\n{cpu}\n{flat}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(vms: usize, versions: f64, cpu_ticks: u64) -> Idle {
        Idle {
            vms,
            tick: TICK,
            window: Duration::from_secs(100),
            versions,
            revisions: 0.0,
            vm_events: 0,
            vm_stats_events: 0,
            cpu_ticks,
            etcd_ticks: 0,
            clk_tck: 100,
        }
    }

    #[test]
    fn rates_scale_to_an_hour_and_a_tick() {
        let r = idle(0, 40.0, 50);
        assert!((r.per_hour(r.versions) - 1440.0).abs() < 1e-9);
        // 0.5 s of CPU over 20 ticks of 5 s: 25 ms per tick, 0.5 % of a core.
        assert!((r.cpu_ms_per_tick() - 25.0).abs() < 1e-9);
        assert!((r.cpu_pct() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn verdicts_compare_the_largest_count_with_none() {
        assert_eq!(
            verdicts(&[idle(0, 40.0, 10), idle(1000, 41.0, 12)]),
            (true, true, true)
        );
        let (h, c, f) = verdicts(&[idle(0, 40.0, 10), idle(1000, 40.0 + 64.0 * 20.0, 300)]);
        assert!(!h && !c && !f);
        assert!(settle(1000) > settle(100) && settle(0) == STATS_ROUND);
        // The real-guest table: 0 and 20 guests, judged by the same rule (40 ms per tick
        // empty: flat up to 60 ms).
        assert!(verdicts(&[idle(0, 40.0, 80), idle(20, 40.0, 120)]).2);
        assert!(!verdicts(&[idle(0, 40.0, 80), idle(20, 40.0, 130)]).2);
    }

    #[test]
    fn the_verdict_rows_name_the_largest_count_and_its_noun() {
        let v = Variant {
            label: "this build".into(),
            bin: PathBuf::from("/bin/debvisord"),
            tick: TICK,
            env: Vec::new(),
        };
        let mut o = String::new();
        let table = [(v.clone(), vec![idle(0, 40.0, 80), idle(20, 40.0, 120)])];
        render_table(&mut o, "t", &table, ("KVM guests", "guest"));
        assert!(o.contains("| this build, 20 KVM guests |"), "{o}");
        assert!(
            o.contains(
                "| keepalive CPU flat: 20-guest tick ≤ max(1.5×, +1 ms) of the empty tick | PASS |"
            ),
            "{o}"
        );
        let mut o = String::new();
        let table = [(v, vec![idle(0, 40.0, 10), idle(1000, 41.0, 12)])];
        render_table(&mut o, "t", &table, Guests::TestDriver.noun());
        assert!(
            o.contains("| etcd history: 1000 idle VMs add ≤ 60 key versions/h | PASS |"),
            "{o}"
        );
        assert_eq!(Guests::TestDriver.sizes(), SIZES.to_vec());
        assert_eq!(Guests::TestDriver.uri(), TEST_URI);
    }
}
