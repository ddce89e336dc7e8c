//! Foundation figures of `debvisor-bench`: the real `debvisord` against a private etcd 3.4
//! on loopback and the libvirt test driver (`test:///default`).
//!
//! Three figures (docs/architecture.md §7):
//!
//! 1. **Startup to `run`** with etcd up: `--runs` restarts of one node (same name and state
//!    dir, the previous run stopped gracefully with SIGTERM), timed from spawn to the
//!    `stage complete`/`keepalive` log line as seen by the bench, and in the daemon's own
//!    clock (`debvisord starting` → `keepalive` timestamps); plus the median of each stage's
//!    `duration_ms`.
//! 2. **Idle RSS and CPU** of one daemon at a 5 s keepalive tick over `--idle-secs`, sampled
//!    from `/proc/<pid>/stat` and `/proc/<pid>/status` every second; etcd's CPU over the same
//!    window for context.
//! 3. **etcd requests per keepalive tick** at a 1 s tick: deltas of etcd's own Prometheus
//!    counters (`GET /metrics`) across a window of `--ticks` ticks, where a tick is a distinct
//!    `mod_revision` of the node's `last_seen` key seen by a watch set up before the window
//!    (the machinery is in [`super::ticks`], shared with the VM figures).
//!
//! Printed and written between the `bench:foundation` markers of `docs/benchmarks.md`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use debvisor_tests::{DaemonBuilder, DaemonProcess, EtcdProcess};
use serde_json::Value;

use super::clock::{now_utc_string, parse_rfc3339_micros};
use super::host::{bench_runtime, clk_tck, cpu_ticks, status_kib};
use super::logs::{num_field, str_field};
use super::report::{bench_command, publish, Machine};
use super::stats::{mib, ms, per_tick, summarize, verdict};
use super::ticks::{count_window, watch_key, TICK_INTERVAL, TICK_TTL, WARMUP_TICKS};
use crate::{Args, BenchResult};

/// Start marker of the generated section in `docs/benchmarks.md`.
const MARK_START: &str = "<!-- bench:foundation:start -->";
/// End marker of the generated section in `docs/benchmarks.md`.
const MARK_END: &str = "<!-- bench:foundation:end -->";
/// Target: median (and p90) startup to `run`.
const TARGET_STARTUP: Duration = Duration::from_secs(2);
/// Target: idle RSS in MiB.
const TARGET_RSS_MIB: f64 = 25.0;
/// Target: idle CPU in percent of one core.
const TARGET_CPU_PCT: f64 = 0.2;
/// How long a daemon may take to reach `run`.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll interval while waiting for a log line (finer than the harness' 20 ms so the wall
/// clock figure is not dominated by polling).
const LINE_POLL: Duration = Duration::from_millis(2);
/// Keepalive settings of the idle figure.
const IDLE_INTERVAL: &str = "5s";
/// Lease TTL of the idle figure.
const IDLE_TTL: &str = "15s";

/// The three foundation figures and their section of the docs.
pub(crate) fn run(args: &Args, machine: &Machine) -> BenchResult<()> {
    let started = now_utc_string();
    let etcd = EtcdProcess::start().map_err(|e| format!("starting etcd: {e}"))?;

    eprintln!("debvisor-bench: [1/3] startup to run, {} runs", args.runs);
    let startup = bench_startup(&etcd, args.runs)?;
    eprintln!(
        "debvisor-bench: [2/3] idle RSS/CPU over {} s",
        args.idle_secs
    );
    let idle = bench_idle(&etcd, args.idle_secs)?;
    eprintln!(
        "debvisor-bench: [3/3] etcd requests over {} ticks",
        args.ticks
    );
    let ticks = bench_ticks(&etcd, args.ticks)?;
    drop(etcd);

    let report = render(args, machine, &started, &startup, &idle, &ticks);
    publish(args, MARK_START, MARK_END, &report)
}

// ---------------------------------------------------------------------------------------
// Figure 1: startup to run
// ---------------------------------------------------------------------------------------

/// One startup run.
#[derive(Debug, Clone)]
struct StartupRun {
    /// Spawn → keepalive line seen by the bench.
    wall: Duration,
    /// `debvisord starting` → keepalive stage line, daemon timestamps.
    daemon: Duration,
    /// `(stage, duration_ms, outcome)` in log order.
    stages: Vec<(String, f64, String)>,
}

/// Results of figure 1.
#[derive(Debug, Clone)]
struct StartupResult {
    runs: Vec<StartupRun>,
}

/// Whether `v` is the `stage complete` line of stage `stage`.
fn is_stage_line(v: &Value, stage: &str) -> bool {
    str_field(v, "message") == Some("stage complete") && str_field(v, "stage") == Some(stage)
}

/// Poll `d`'s output every [`LINE_POLL`] until a JSON line matches `pred`; returns the
/// time since `t0` at which it was seen. Fails on exit or after `timeout`.
fn wait_line(
    d: &mut DaemonProcess,
    t0: Instant,
    pred: impl Fn(&Value) -> bool,
    what: &str,
    timeout: Duration,
) -> BenchResult<Duration> {
    let deadline = Instant::now() + timeout;
    let mut seen = 0;
    loop {
        let running = d.is_running();
        let lines = d.lines();
        let now = Instant::now();
        for line in lines.iter().skip(seen) {
            seen += 1;
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                if pred(&v) {
                    return Ok(now.duration_since(t0));
                }
            }
        }
        if !running {
            // Let the reader threads drain the pipes once more before giving up.
            std::thread::sleep(Duration::from_millis(100));
            if d.json_lines().iter().skip(seen).any(&pred) {
                return Ok(t0.elapsed());
            }
            return Err(format!(
                "debvisord {} exited while waiting for {what}\n{}",
                d.node(),
                d.tail(40)
            ));
        }
        if now >= deadline {
            return Err(format!(
                "timed out after {timeout:?} waiting for {what} from debvisord {}\n{}",
                d.node(),
                d.tail(40)
            ));
        }
        std::thread::sleep(LINE_POLL);
    }
}

/// Spawn a daemon for `node` with `env` overrides and wait until it logs the keepalive
/// stage (i.e. reached `run`); returns it with the wall time it took.
fn spawn_to_run(
    etcd: &EtcdProcess,
    node: &str,
    state_dir: Option<&Path>,
    env: &[(&str, &str)],
) -> BenchResult<(DaemonProcess, Duration)> {
    let mut b = DaemonBuilder::new(node).endpoints(&[etcd.endpoint()]);
    for (k, v) in env {
        b = b.env(k, v);
    }
    if let Some(dir) = state_dir {
        b = b.state_dir(dir);
    }
    let t0 = Instant::now();
    let mut d = b
        .spawn()
        .map_err(|e| format!("spawning debvisord {node}: {e}"))?;
    let wall = wait_line(
        &mut d,
        t0,
        |v| is_stage_line(v, "keepalive"),
        "the keepalive stage (run)",
        RUN_TIMEOUT,
    )?;
    Ok((d, wall))
}

/// SIGTERM `d` and wait for a clean exit.
fn stop_gracefully(mut d: DaemonProcess) -> BenchResult<()> {
    d.signal(libc::SIGTERM)
        .map_err(|e| format!("SIGTERM to debvisord {}: {e}", d.node()))?;
    let status = d
        .wait_exit(STOP_TIMEOUT)
        .map_err(|e| format!("stopping debvisord {}: {e}", d.node()))?;
    if !status.success() {
        return Err(format!(
            "debvisord {} exited with {status} after SIGTERM\n{}",
            d.node(),
            d.tail(40)
        ));
    }
    Ok(())
}

/// Figure 1: `runs` restarts of node `bench-start` sharing one state dir.
fn bench_startup(etcd: &EtcdProcess, runs: usize) -> BenchResult<StartupResult> {
    let state = tempfile::Builder::new()
        .prefix("debvisor-bench-state-")
        .tempdir()
        .map_err(|e| format!("creating a state dir: {e}"))?;
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs {
        let (d, wall) = spawn_to_run(etcd, "bench-start", Some(state.path()), &[])?;
        let lines = d.json_lines();
        let ts = |pred: &dyn Fn(&Value) -> bool, what: &str| -> BenchResult<i64> {
            let v = lines
                .iter()
                .find(|v| pred(v))
                .ok_or_else(|| format!("run {i}: no {what} line"))?;
            let t = str_field(v, "timestamp")
                .ok_or_else(|| format!("run {i}: {what} line has no timestamp: {v}"))?;
            parse_rfc3339_micros(t).ok_or_else(|| format!("run {i}: bad timestamp {t:?}"))
        };
        let t_start = ts(
            &|v| str_field(v, "message") == Some("debvisord starting"),
            "\"debvisord starting\"",
        )?;
        let t_run = ts(&|v| is_stage_line(v, "keepalive"), "keepalive stage")?;
        let daemon = Duration::from_micros(
            u64::try_from(t_run - t_start)
                .map_err(|_| format!("run {i}: keepalive line is older than the starting line"))?,
        );
        let stages = lines
            .iter()
            .filter(|v| str_field(v, "message") == Some("stage complete"))
            .filter_map(|v| {
                Some((
                    str_field(v, "stage")?.to_owned(),
                    num_field(v, "duration_ms")?,
                    str_field(v, "outcome").unwrap_or("?").to_owned(),
                ))
            })
            .collect();
        eprintln!(
            "debvisor-bench: startup run {}: wall {:.1} ms, daemon {:.1} ms",
            i + 1,
            ms(wall),
            ms(daemon)
        );
        out.push(StartupRun {
            wall,
            daemon,
            stages,
        });
        stop_gracefully(d)?;
    }
    Ok(StartupResult { runs: out })
}

// ---------------------------------------------------------------------------------------
// Figure 2: idle RSS and CPU
// ---------------------------------------------------------------------------------------

/// Results of figure 2.
#[derive(Debug, Clone)]
struct IdleResult {
    /// Measured window (first to last sample).
    window: Duration,
    /// Samples taken (including the first).
    samples: usize,
    rss_start_kib: u64,
    rss_end_kib: u64,
    rss_max_kib: u64,
    /// VmHWM at the end (peak RSS over the daemon's life, startup included).
    hwm_kib: u64,
    /// RssAnon at the end (heap, stacks).
    anon_kib: u64,
    /// RssFile at the end (mapped binary and shared libraries).
    file_kib: u64,
    /// Threads at the end.
    threads: u64,
    /// Daemon utime+stime ticks over the window.
    daemon_ticks: u64,
    /// etcd utime+stime ticks over the window.
    etcd_ticks: u64,
    /// `sysconf(_SC_CLK_TCK)`.
    clk_tck: u64,
}

impl IdleResult {
    /// CPU percent of one core for `ticks` over the window.
    fn cpu_pct(&self, ticks: u64) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs <= 0.0 || self.clk_tck == 0 {
            return f64::NAN;
        }
        ticks as f64 / self.clk_tck as f64 / secs * 100.0
    }
}

/// Figure 2: one daemon at a 5 s tick, settled for 5 s, sampled every second.
fn bench_idle(etcd: &EtcdProcess, secs: u64) -> BenchResult<IdleResult> {
    let tck = clk_tck()?;
    let etcd_pid = etcd.pid().ok_or("etcd is not running")?;
    let (mut d, _) = spawn_to_run(
        etcd,
        "bench-idle",
        None,
        &[
            ("DEBVISOR_KEEPALIVE_INTERVAL", IDLE_INTERVAL),
            ("DEBVISOR_KEEPALIVE_LEASE_TTL", IDLE_TTL),
        ],
    )?;
    let pid = d.pid();
    std::thread::sleep(Duration::from_secs(5));
    let t0 = Instant::now();
    let cpu0 = cpu_ticks(pid)?;
    let etcd0 = cpu_ticks(etcd_pid)?;
    let rss_start = status_kib(pid, "VmRSS")?;
    let mut rss_max = rss_start;
    let mut rss_last = rss_start;
    let mut samples = 1;
    for i in 1..=secs {
        let due = t0 + Duration::from_secs(i);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if !d.is_running() {
            return Err(format!(
                "debvisord bench-idle exited during the idle window\n{}",
                d.tail(40)
            ));
        }
        rss_last = status_kib(pid, "VmRSS")?;
        rss_max = rss_max.max(rss_last);
        samples += 1;
    }
    let cpu1 = cpu_ticks(pid)?;
    let etcd1 = cpu_ticks(etcd_pid)?;
    let window = t0.elapsed();
    let hwm = status_kib(pid, "VmHWM")?;
    let anon = status_kib(pid, "RssAnon")?;
    let file = status_kib(pid, "RssFile")?;
    let threads = status_kib(pid, "Threads")?;
    stop_gracefully(d)?;
    Ok(IdleResult {
        window,
        samples,
        rss_start_kib: rss_start,
        rss_end_kib: rss_last,
        rss_max_kib: rss_max,
        hwm_kib: hwm,
        anon_kib: anon,
        file_kib: file,
        threads,
        daemon_ticks: cpu1.saturating_sub(cpu0),
        etcd_ticks: etcd1.saturating_sub(etcd0),
        clk_tck: tck,
    })
}

// ---------------------------------------------------------------------------------------
// Figure 3: etcd requests per keepalive tick
// ---------------------------------------------------------------------------------------

/// One row of the per-tick table.
#[derive(Debug, Clone)]
struct TickRow {
    /// What is counted.
    label: String,
    /// Delta over the window (`None`: not exposed by this etcd).
    delta: Option<f64>,
    /// Expected per tick, if there is a target.
    target: Option<(f64, f64)>,
    /// Target text.
    target_text: String,
}

/// Results of figure 3.
#[derive(Debug, Clone)]
struct TickResult {
    ticks: usize,
    window: Duration,
    rows: Vec<TickRow>,
    /// mod_revisions counted (first, last).
    revisions: (i64, i64),
}

/// Figure 3: a daemon at a 1 s tick; etcd counters before/after `n` ticks.
///
/// The watch on `last_seen` is created (and its first events received) before the first
/// metrics snapshot and dropped after the second, so the bench sends no gRPC request inside
/// the window: the `/metrics` GETs are plain HTTP and do not touch the gRPC counters. Both
/// snapshots are taken half an interval after a tick, so each tick in the window is counted
/// whole.
fn bench_ticks(etcd: &EtcdProcess, n: usize) -> BenchResult<TickResult> {
    let interval = format!("{}s", TICK_INTERVAL.as_secs());
    let ttl = format!("{}s", TICK_TTL.as_secs());
    let node = "bench-ticks";
    let (d, _) = spawn_to_run(
        etcd,
        node,
        None,
        &[
            ("DEBVISOR_KEEPALIVE_INTERVAL", &interval),
            ("DEBVISOR_KEEPALIVE_LEASE_TTL", &ttl),
        ],
    )?;
    let rt = bench_runtime(1)?;
    let (tx, rx) = mpsc::channel();
    let key = format!("/debvisor/nodes/{node}/last_seen");
    let watcher = rt.spawn(watch_key(etcd.endpoint(), key, tx));
    let res = count_window(etcd, &rx, n);
    watcher.abort();
    rt.shutdown_timeout(Duration::from_secs(5));
    let (ticks, window, revisions, before, after) = res?;
    stop_gracefully(d)?;

    let delta = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        Some(after.sum(name, labels)? - before.sum(name, labels)?)
    };
    let mut rows = Vec::new();
    let handled = |m: &str| delta("grpc_server_handled_total", &[("grpc_method", m)]);
    rows.push(TickRow {
        label: "gRPC Txn (unary, handled)".into(),
        delta: handled("Txn"),
        target: Some((1.0, 0.05)),
        target_text: "1".into(),
    });
    for m in [
        "Range",
        "Put",
        "DeleteRange",
        "LeaseGrant",
        "LeaseRevoke",
        "LeaseTimeToLive",
    ] {
        rows.push(TickRow {
            label: format!("gRPC {m} (unary, handled)"),
            delta: handled(m),
            target: Some((0.0, 0.0)),
            target_text: "0".into(),
        });
    }
    // The keeper refreshes at TTL/3 (at least 200 ms): expected refreshes per tick.
    let period = (TICK_TTL / 3).max(Duration::from_millis(200));
    let ka_per_tick = TICK_INTERVAL.as_secs_f64() / period.as_secs_f64();
    rows.push(TickRow {
        label: "LeaseKeepAlive stream msgs received".into(),
        delta: delta(
            "grpc_server_msg_received_total",
            &[("grpc_method", "LeaseKeepAlive")],
        ),
        // The window holds n ticks but n±1 keep-alives depending on phase.
        target: Some((ka_per_tick, 1.0 / n as f64 + 0.05)),
        target_text: format!("≈{ka_per_tick:.0} (TTL/3)"),
    });
    rows.push(TickRow {
        label: "Watch stream msgs received".into(),
        delta: delta(
            "grpc_server_msg_received_total",
            &[
                ("grpc_method", "Watch"),
                ("grpc_service", "etcdserverpb.Watch"),
            ],
        ),
        target: Some((0.0, 0.0)),
        target_text: "0".into(),
    });
    for (label, name) in [
        ("etcd_mvcc_txn_total", "etcd_mvcc_txn_total"),
        ("etcd_mvcc_put_total", "etcd_mvcc_put_total"),
        ("etcd_mvcc_range_total", "etcd_mvcc_range_total"),
        (
            "etcd_debugging_mvcc_txn_total",
            "etcd_debugging_mvcc_txn_total",
        ),
        (
            "store revision (etcd_debugging_mvcc_current_revision)",
            "etcd_debugging_mvcc_current_revision",
        ),
        (
            "raft proposals committed",
            "etcd_server_proposals_committed_total",
        ),
    ] {
        rows.push(TickRow {
            label: label.into(),
            delta: delta(name, &[]),
            target: None,
            target_text: "-".into(),
        });
    }
    Ok(TickResult {
        ticks,
        window,
        rows,
        revisions,
    })
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

/// The markdown section (also printed to stdout).
fn render(
    args: &Args,
    m: &Machine,
    started: &str,
    s: &StartupResult,
    idle: &IdleResult,
    t: &TickResult,
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let cmd = bench_command(args, m);
    let _ = writeln!(o, "### Foundation figures ({started})\n");
    let _ = writeln!(o, "- command: `{cmd}`");
    let _ = writeln!(o, "- machine: {m}");
    let _ = writeln!(
        o,
        "- profile: `{}` (bench and `debvisord`); etcd 3.4 (`/usr/bin/etcd`) on loopback, \
         libvirt `test:///default`\n",
        m.profile
    );

    // Figure 1.
    let wall: Vec<f64> = s.runs.iter().map(|r| ms(r.wall)).collect();
    let own: Vec<f64> = s.runs.iter().map(|r| ms(r.daemon)).collect();
    let ws = summarize(&wall);
    let ds = summarize(&own);
    let target_ms = ms(TARGET_STARTUP);
    let _ = writeln!(
        o,
        "#### 1. Startup to `run` with etcd up ({} runs)\n",
        s.runs.len()
    );
    let _ = writeln!(
        o,
        "Same node name and state dir each run; the previous run stopped with SIGTERM and \
         reaped first (run 1 registers the node for the first time). *Bench wall*: spawn → \
         the `stage complete`/`keepalive` line read from the daemon's stderr (2 ms polling). \
         *Daemon clock*: timestamp of `debvisord starting` → that line. The difference (third \
         row) is what the daemon's clock cannot see: exec, dynamic linking (libvirt and its \
         libraries), runtime, config and logger setup, and reading the line off the pipe.\n"
    );
    let _ = writeln!(
        o,
        "| measure | median | min | max | p90 | target | verdict |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---|---|");
    let _ = writeln!(
        o,
        "| bench wall (ms) | {:.1} | {:.1} | {:.1} | {:.1} | median and p90 ≤ {target_ms:.0} | {} |",
        ws.median,
        ws.min,
        ws.max,
        ws.p90,
        verdict(ws.median <= target_ms && ws.p90 <= target_ms)
    );
    let _ = writeln!(
        o,
        "| daemon clock (ms) | {:.1} | {:.1} | {:.1} | {:.1} | - | - |",
        ds.median, ds.min, ds.max, ds.p90
    );
    let outside: Vec<f64> = s.runs.iter().map(|r| ms(r.wall) - ms(r.daemon)).collect();
    let os = summarize(&outside);
    let _ = writeln!(
        o,
        "| outside the daemon clock: wall − daemon (ms) | {:.1} | {:.1} | {:.1} | {:.1} | - | - |",
        os.median, os.min, os.max, os.p90
    );
    let _ = writeln!(
        o,
        "\nPer run, bench wall (ms): {}\n",
        wall.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        o,
        "Reference: PVC spends ≥ 20 s of fixed sleeps in its startup.\n"
    );
    // Stage table in log order of the first run, medians across runs.
    let mut order: Vec<String> = Vec::new();
    let mut per_stage: HashMap<String, (Vec<f64>, Vec<String>)> = HashMap::new();
    for r in &s.runs {
        for (stage, dur, outcome) in &r.stages {
            if !order.contains(stage) {
                order.push(stage.clone());
            }
            let e = per_stage.entry(stage.clone()).or_default();
            e.0.push(*dur);
            if !e.1.contains(outcome) {
                e.1.push(outcome.clone());
            }
        }
    }
    let _ = writeln!(o, "| stage | median ms | max ms | outcome |");
    let _ = writeln!(o, "|---|---:|---:|---|");
    for stage in &order {
        if let Some((durs, outcomes)) = per_stage.get(stage) {
            let st = summarize(durs);
            let _ = writeln!(
                o,
                "| {stage} | {:.1} | {:.1} | {} |",
                st.median,
                st.max,
                outcomes.join(", ")
            );
        }
    }

    // Figure 2.
    let cpu = idle.cpu_pct(idle.daemon_ticks);
    let etcd_cpu = idle.cpu_pct(idle.etcd_ticks);
    let _ = writeln!(
        o,
        "\n#### 2. Idle RSS and CPU (keepalive every {IDLE_INTERVAL}, lease TTL {IDLE_TTL})\n"
    );
    let _ = writeln!(
        o,
        "One daemon in `run`, settled 5 s, then `/proc/<pid>/status` VmRSS sampled every \
         second ({} samples over {:.1} s); CPU = Δ(utime+stime) / CLK_TCK ({}) / window × \
         100, resolution {:.3} % at this window. MiB = kB / 1024.\n",
        idle.samples,
        idle.window.as_secs_f64(),
        idle.clk_tck,
        100.0 / idle.clk_tck as f64 / idle.window.as_secs_f64()
    );
    let _ = writeln!(o, "| measure | value | target | verdict |");
    let _ = writeln!(o, "|---|---:|---|---|");
    let _ = writeln!(
        o,
        "| debvisord RSS at end (MiB) | {:.1} | ≤ {TARGET_RSS_MIB:.0} | {} |",
        mib(idle.rss_end_kib),
        verdict(mib(idle.rss_end_kib) <= TARGET_RSS_MIB)
    );
    let _ = writeln!(
        o,
        "| debvisord RSS max over window (MiB) | {:.1} | ≤ {TARGET_RSS_MIB:.0} | {} |",
        mib(idle.rss_max_kib),
        verdict(mib(idle.rss_max_kib) <= TARGET_RSS_MIB)
    );
    let _ = writeln!(
        o,
        "| debvisord RSS at window start / VmHWM (MiB) | {:.1} / {:.1} | - | - |",
        mib(idle.rss_start_kib),
        mib(idle.hwm_kib)
    );
    let _ = writeln!(
        o,
        "| debvisord RSS at end: anon / file-backed (MiB), threads | {:.1} / {:.1}, {} | - | - |",
        mib(idle.anon_kib),
        mib(idle.file_kib),
        idle.threads
    );
    let _ = writeln!(
        o,
        "| debvisord CPU (% of one core) | {cpu:.3} (Δ ticks = {}) | ≤ {TARGET_CPU_PCT} | {} |",
        idle.daemon_ticks,
        verdict(cpu <= TARGET_CPU_PCT)
    );
    let _ = writeln!(
        o,
        "| etcd CPU, same window (% of one core) | {etcd_cpu:.3} (Δ ticks = {}) | - (context) | - |",
        idle.etcd_ticks
    );

    // Figure 3.
    let _ = writeln!(
        o,
        "\n#### 3. etcd requests per keepalive tick (tick {}s, lease TTL {}s)\n",
        TICK_INTERVAL.as_secs(),
        TICK_TTL.as_secs()
    );
    let _ = writeln!(
        o,
        "Deltas of etcd's `/metrics` across a window of **{} ticks** ({:.2} s). A tick is a \
         distinct `mod_revision` of `/debvisor/nodes/bench-ticks/last_seen` (revisions {}–{}) \
         whose watch event arrived between the two snapshots; each snapshot is taken half an \
         interval after a tick, after {WARMUP_TICKS} warm-up ticks. The bench's own watch is \
         opened before the first snapshot and dropped after the second, and `/metrics` is \
         plain HTTP, so none of the bench's requests fall into these gRPC counters (the \
         Watch row checks it). Unary counts sum `grpc_server_handled_total` over all codes.\n",
        t.ticks,
        t.window.as_secs_f64(),
        t.revisions.0,
        t.revisions.1
    );
    let _ = writeln!(
        o,
        "| counter | Δ window | per tick | target / tick | verdict |"
    );
    let _ = writeln!(o, "|---|---:|---:|---|---|");
    for r in &t.rows {
        let (d, pt, v) = match r.delta {
            Some(d) => {
                let pt = if t.ticks > 0 {
                    d / t.ticks as f64
                } else {
                    f64::NAN
                };
                let v = match r.target {
                    Some((want, tol)) => verdict((pt - want).abs() <= tol + 1e-9),
                    None => "-",
                };
                (format!("{d:.0}"), per_tick(pt), v)
            }
            None => ("n/a".into(), "n/a".into(), "-"),
        };
        let _ = writeln!(o, "| {} | {d} | {pt} | {} | {v} |", r.label, r.target_text);
    }
    let _ = writeln!(
        o,
        "\nThe `etcd_mvcc_*`, revision and proposal rows are etcd's internal work, not client \
         requests: `etcd_mvcc_range_total` counts reads made inside the transaction (its \
         lease compare among them) while no Range RPC was handled; `etcd_mvcc_put_total` is \
         the keys written (`health`, `last_seen`; `info` only when it changed)."
    );
    o
}
