//! `debvisor-bench`: foundation benchmarks of the real `debvisord` against a private etcd 3.4
//! on loopback and the libvirt test driver (`test:///default`).
//!
//! Three figures (DESIGN.md §7):
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
//!    `mod_revision` of the node's `last_seen` key seen by a watch set up before the window.
//!
//! Then the issue-4 figures (module `bench_networks` below, needs root): time for a real
//! daemon in a network namespace to converge `--networks` managed networks written to etcd
//! (create, then delete), with the firewall off and on, and the nft apply cost of that many
//! networks' chains in one batch versus one change per network.
//!
//! Then the issue-3 figures (module `bench_vms`, `bench/vms.rs`): the Domain object's start
//! latency (etcd write → libvirt start) and convergence of `--vms` VMs on the test driver,
//! etcd requests per keepalive tick with those VMs running against none, and write →
//! `running` of `--guests` real guests on `qemu:///system` (root).
//!
//! Run with `cargo run --release -p debvisor-tests --bin debvisor-bench` (the daemon is built
//! in the profile of this executable); `--networks-only` / `--skip-networks` and
//! `--vms-only` / `--skip-vms` select parts.
//! Tables go to stdout and, unless `--no-write`, into `docs/benchmarks.md` between
//! `<!-- bench:foundation:start -->` and `<!-- bench:foundation:end -->` (and the
//! `bench:networks`, `bench:vms`, `bench:ceph` and `bench:ceph-objects` markers). The daemons' own log lines are echoed on stderr by the harness.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use debvisor_tests::{DaemonBuilder, DaemonProcess, EtcdProcess};
use serde_json::Value;

/// Result type of the bench: errors are human-readable strings with their context.
type BenchResult<T> = Result<T, String>;

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
/// Keepalive interval of the requests-per-tick figure.
const TICK_INTERVAL: Duration = Duration::from_secs(1);
/// Lease TTL of the requests-per-tick figure.
const TICK_TTL: Duration = Duration::from_secs(3);
/// Ticks skipped after `run` before the counting window starts.
const WARMUP_TICKS: usize = 2;
/// Largest `/metrics` response accepted.
const METRICS_MAX_BYTES: u64 = 32 * 1024 * 1024;

/// Command-line options.
#[derive(Debug, Clone)]
struct Args {
    /// Startup runs.
    runs: usize,
    /// Idle window in seconds.
    idle_secs: u64,
    /// Keepalive ticks in the request-count window.
    ticks: usize,
    /// Whether to update `docs/benchmarks.md`.
    write: bool,
    /// Managed networks of the issue-4 figures.
    networks: usize,
    /// Run only the issue-4 (networks) figures.
    networks_only: bool,
    /// Skip the issue-4 (networks) figures.
    skip_networks: bool,
    /// VMs of the issue-3 (Domain object) figures.
    vms: usize,
    /// Real guests of the issue-3 figure 4.
    guests: usize,
    /// Writes per second of the issue-3 latency figure.
    vm_rate: u32,
    /// Run only the issue-3 (VMs) figures.
    vms_only: bool,
    /// Skip the issue-3 (VMs) figures.
    skip_vms: bool,
    /// Run only the Ceph state-collection figures (`bench/ceph.rs`).
    ceph: bool,
    /// Run only the Ceph-object figure (`bench/ceph_objects.rs`).
    ceph_objects: bool,
    /// The arguments as given, for the report.
    raw: Vec<String>,
}

const USAGE: &str = "usage: debvisor-bench [--runs N] [--idle-secs S] [--ticks N] [--networks N]
                      [--networks-only | --skip-networks] [--vms N] [--vm-rate R] [--guests N]
                      [--vms-only | --skip-vms] [--no-write]

  --runs N          startup runs (default 10)
  --idle-secs S     idle RSS/CPU window in seconds (default 60)
  --ticks N         keepalive ticks in the etcd request window (default 20)
  --networks N      managed networks of the issue-4 figures (default 100; needs root)
  --networks-only   run only the issue-4 (networks) figures
  --skip-networks   skip the issue-4 (networks) figures
  --vms N           VMs of the issue-3 (Domain object) figures (default 1000)
  --vm-rate R       writes per second of the VM start-latency figure (default 100)
  --guests N        real KVM guests of the issue-3 figure 4 (default 10; needs root)
  --vms-only        run only the issue-3 (VMs) figures
  --skip-vms        skip the issue-3 (VMs) figures
  --ceph            run only the Ceph state-collection figures (bench/ceph.rs)
  --ceph-objects    run only the Ceph-object figure (snapshot request → in Ceph)
  --no-write        print only; do not update docs/benchmarks.md";

/// Parse `std::env::args()`; `Ok(None)` for `--help`.
fn parse_args() -> BenchResult<Option<Args>> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut args = Args {
        runs: 10,
        idle_secs: 60,
        ticks: 20,
        write: true,
        networks: 100,
        networks_only: false,
        skip_networks: false,
        vms: 1000,
        guests: 10,
        vm_rate: 100,
        vms_only: false,
        skip_vms: false,
        ceph: false,
        ceph_objects: false,
        raw: raw.clone(),
    };
    let mut it = raw.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (a.as_str(), None),
        };
        let mut value = |name: &str| -> BenchResult<u64> {
            let v = match inline.clone() {
                Some(v) => v,
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))?,
            };
            v.parse::<u64>()
                .map_err(|e| format!("{name} {v:?}: {e}\n{USAGE}"))
        };
        match flag {
            "--runs" => args.runs = usize::try_from(value("--runs")?).map_err(|e| e.to_string())?,
            "--idle-secs" => args.idle_secs = value("--idle-secs")?,
            "--ticks" => {
                args.ticks = usize::try_from(value("--ticks")?).map_err(|e| e.to_string())?
            }
            "--networks" => {
                args.networks = usize::try_from(value("--networks")?).map_err(|e| e.to_string())?
            }
            "--networks-only" => args.networks_only = true,
            "--vms" => args.vms = usize::try_from(value("--vms")?).map_err(|e| e.to_string())?,
            "--guests" => {
                args.guests = usize::try_from(value("--guests")?).map_err(|e| e.to_string())?
            }
            "--vm-rate" => {
                args.vm_rate = u32::try_from(value("--vm-rate")?).map_err(|e| e.to_string())?
            }
            "--vms-only" => args.vms_only = true,
            "--skip-vms" => args.skip_vms = true,
            "--ceph-objects" => args.ceph_objects = true,
            "--skip-networks" => args.skip_networks = true,
            "--ceph" => args.ceph = true,
            "--no-write" => args.write = false,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if args.runs == 0 || args.idle_secs == 0 || args.ticks == 0 {
        return Err(format!(
            "--runs, --idle-secs and --ticks must be at least 1\n{USAGE}"
        ));
    }
    if args.networks_only && args.skip_networks {
        return Err(format!(
            "--networks-only and --skip-networks exclude each other\n{USAGE}"
        ));
    }
    if args.vms_only && (args.skip_vms || args.networks_only) {
        return Err(format!(
            "--vms-only excludes --skip-vms and --networks-only\n{USAGE}"
        ));
    }
    if !(1..=bench_vms::MAX_VMS).contains(&args.vms)
        || args.guests == 0
        || !(1..=1000).contains(&args.vm_rate)
    {
        return Err(format!(
            "--vms must be between 1 and {}, --vm-rate between 1 and 1000, --guests at \
             least 1\n{USAGE}",
            bench_vms::MAX_VMS
        ));
    }
    if !(1..=bench_networks::MAX_NETWORKS).contains(&args.networks) {
        return Err(format!(
            "--networks must be between 1 and {}\n{USAGE}",
            bench_networks::MAX_NETWORKS
        ));
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("debvisor-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("debvisor-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Run the selected parts, print each report and (unless `--no-write`) write it to the docs.
/// Every spawned process is owned by a local and killed by its `Drop` on every return path.
fn run(args: &Args) -> BenchResult<()> {
    if args.ceph {
        return bench_ceph::run(args, &Machine::probe());
    }
    if args.ceph_objects {
        return bench_ceph_objects::run(args, &Machine::probe());
    }
    let networks = !args.skip_networks && !args.vms_only;
    if networks && !debvisor_tests::is_root() {
        return Err(
            "the networks figures need root (network namespaces); run as root or pass \
             --skip-networks"
                .into(),
        );
    }
    let machine = Machine::probe();
    // Build the daemon (same profile as this executable) before any timing starts.
    let daemon_bin = debvisor_tests::bin_path("debvisord");
    eprintln!("debvisor-bench: daemon binary {}", daemon_bin.display());
    if !args.networks_only && !args.vms_only {
        run_foundation(args, &machine)?;
    }
    if networks {
        bench_networks::run(args, &machine)?;
    }
    if !args.skip_vms && !args.networks_only {
        bench_vms::run(args, &machine)?;
    }
    Ok(())
}

/// The three foundation figures and their section of the docs.
fn run_foundation(args: &Args, machine: &Machine) -> BenchResult<()> {
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

/// A string field of a JSON log line.
fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// A numeric field that the daemon may log as a number or as a formatted string.
fn num_field(v: &Value, key: &str) -> Option<f64> {
    match v.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
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

/// `sysconf(_SC_CLK_TCK)`.
fn clk_tck() -> BenchResult<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(v)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("sysconf(_SC_CLK_TCK) returned {v}"))
}

/// utime + stime of `pid` in clock ticks, from `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> BenchResult<u64> {
    let path = format!("/proc/{pid}/stat");
    let s = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = s
        .rfind(')')
        .map(|i| &s[i + 1..])
        .ok_or_else(|| format!("{path}: no ')' in {s:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): utime is field 14, stime field 15.
    let get = |idx: usize, name: &str| -> BenchResult<u64> {
        fields
            .get(idx)
            .ok_or_else(|| format!("{path}: no {name} field"))?
            .parse::<u64>()
            .map_err(|e| format!("{path}: {name}: {e}"))
    };
    Ok(get(11, "utime")? + get(12, "stime")?)
}

/// A numeric line of `/proc/<pid>/status` (`VmRSS`, `VmHWM` in kB; `Threads`).
fn status_kib(pid: u32, key: &str) -> BenchResult<u64> {
    let path = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    let line = s
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .ok_or_else(|| format!("{path}: no {key} line"))?;
    let num = line.trim().trim_end_matches("kB").trim();
    num.parse::<u64>()
        .map_err(|e| format!("{path}: {key} {num:?}: {e}"))
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

/// Parsed Prometheus text exposition: `(name, labels) → value`.
#[derive(Debug, Clone, Default)]
struct Metrics {
    series: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    /// Parse the text format (comments and unparsable lines are skipped).
    fn parse(text: &str) -> Metrics {
        let series = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_sample)
            .collect();
        Metrics { series }
    }

    /// Sum of every series named `name` whose labels include all of `labels`; `None` when no
    /// series matches.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for (n, l, v) in &self.series {
            if n == name
                && labels
                    .iter()
                    .all(|(k, want)| l.get(*k).map(String::as_str) == Some(*want))
            {
                found = true;
                total += v;
            }
        }
        found.then_some(total)
    }
}

/// Parse one sample line `name{k="v",…} value [timestamp]`.
fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let mut labels = BTreeMap::new();
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            let name = &line[..i];
            let mut chars = line[i + 1..].char_indices();
            let body_start = i + 1;
            // Scan label pairs until the closing brace, honouring escapes in values.
            let mut end = None;
            let mut key = String::new();
            let mut val = String::new();
            let mut in_val = false;
            let mut esc = false;
            while let Some((j, c)) = chars.next() {
                if in_val {
                    if esc {
                        val.push(match c {
                            'n' => '\n',
                            other => other,
                        });
                        esc = false;
                    } else if c == '\\' {
                        esc = true;
                    } else if c == '"' {
                        labels.insert(std::mem::take(&mut key), std::mem::take(&mut val));
                        in_val = false;
                    } else {
                        val.push(c);
                    }
                    continue;
                }
                match c {
                    '}' => {
                        end = Some(body_start + j + 1);
                        break;
                    }
                    '=' => {
                        // Expect an opening quote next.
                        if chars.next().map(|(_, q)| q) != Some('"') {
                            return None;
                        }
                        in_val = true;
                    }
                    ',' | ' ' => {}
                    other => key.push(other),
                }
            }
            (name, &line[end?..])
        }
        Some(i) => (&line[..i], &line[i..]),
        None => return None,
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name.to_owned(), labels, value))
}

/// `GET /metrics` over plain HTTP/1.0 on `addr`.
fn fetch_metrics(addr: SocketAddr) -> BenchResult<Metrics> {
    let io = |what: &str, e: std::io::Error| format!("GET http://{addr}/metrics: {what}: {e}");
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| io("connect", e))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| io("set_read_timeout", e))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| io("set_write_timeout", e))?;
    s.write_all(
        format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n").as_bytes(),
    )
    .map_err(|e| io("write", e))?;
    let mut buf = Vec::new();
    s.take(METRICS_MAX_BYTES)
        .read_to_end(&mut buf)
        .map_err(|e| io("read", e))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET http://{addr}/metrics: no header/body separator"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("GET http://{addr}/metrics: {status}"));
    }
    Ok(Metrics::parse(body))
}

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

/// A watch event forwarded by the watcher task.
enum WatchMsg {
    /// A put of `last_seen` with its mod_revision, seen at the given instant.
    Put(i64, Instant),
    /// The watcher failed.
    Failed(String),
}

/// Watch `key` on `etcd` and forward every put to `tx`.
async fn watch_key(endpoint: String, key: String, tx: mpsc::Sender<WatchMsg>) {
    let res: Result<(), String> = async {
        let mut c = etcd_client::Client::connect([endpoint.as_str()], None)
            .await
            .map_err(|e| format!("connecting the watcher to {endpoint}: {e}"))?;
        let mut stream = c
            .watch(key.as_str(), None)
            .await
            .map_err(|e| format!("watching {key}: {e}"))?;
        loop {
            let msg = stream
                .message()
                .await
                .map_err(|e| format!("watch {key}: {e}"))?
                .ok_or_else(|| format!("watch {key}: stream closed"))?;
            if msg.canceled() {
                return Err(format!("watch {key} canceled by etcd"));
            }
            let now = Instant::now();
            for ev in msg.events() {
                if ev.event_type() == etcd_client::EventType::Put {
                    if let Some(kv) = ev.kv() {
                        if tx.send(WatchMsg::Put(kv.mod_revision(), now)).is_err() {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
    .await;
    if let Err(e) = res {
        let _ = tx.send(WatchMsg::Failed(e));
    }
}

/// Receive the next put (skipping nothing), failing on watcher error or after `timeout`.
fn next_put(rx: &mpsc::Receiver<WatchMsg>, timeout: Duration) -> BenchResult<(i64, Instant)> {
    match rx.recv_timeout(timeout) {
        Ok(WatchMsg::Put(rev, at)) => Ok((rev, at)),
        Ok(WatchMsg::Failed(e)) => Err(e),
        Err(e) => Err(format!("no last_seen update within {timeout:?}: {e}")),
    }
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("building a tokio runtime: {e}"))?;
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

/// Type of the measured window: ticks, window length, first/last revision, metrics before
/// and after.
type Window = (usize, Duration, (i64, i64), Metrics, Metrics);

/// Wait for warm-up ticks, snapshot metrics half an interval after a tick, count `n` ticks,
/// snapshot again half an interval after the last; ticks are the distinct mod_revisions whose
/// watch events arrived between the two snapshots.
fn count_window(
    etcd: &EtcdProcess,
    rx: &mpsc::Receiver<WatchMsg>,
    n: usize,
) -> BenchResult<Window> {
    let tick_timeout = TICK_INTERVAL * 5;
    let half = TICK_INTERVAL / 2;
    let addr = etcd.client_addr();
    for _ in 0..WARMUP_TICKS {
        next_put(rx, tick_timeout)?;
    }
    std::thread::sleep(half);
    let t_a = Instant::now();
    let before = fetch_metrics(addr)?;
    let mut revs: Vec<(i64, Instant)> = Vec::with_capacity(n + 2);
    // Bounded: at most n puts (each within tick_timeout) plus stragglers.
    while revs.iter().filter(|(_, at)| *at > t_a).count() < n {
        revs.push(next_put(rx, tick_timeout)?);
    }
    std::thread::sleep(half);
    let after = fetch_metrics(addr)?;
    let t_b = Instant::now();
    while let Ok(msg) = rx.try_recv() {
        match msg {
            WatchMsg::Put(rev, at) => revs.push((rev, at)),
            WatchMsg::Failed(e) => return Err(e),
        }
    }
    let mut inside: Vec<i64> = revs
        .iter()
        .filter(|(_, at)| *at > t_a && *at < t_b)
        .map(|(r, _)| *r)
        .collect();
    inside.sort_unstable();
    inside.dedup();
    let first = inside.first().copied().unwrap_or(0);
    let last = inside.last().copied().unwrap_or(0);
    Ok((
        inside.len(),
        t_b.duration_since(t_a),
        (first, last),
        before,
        after,
    ))
}

// ---------------------------------------------------------------------------------------
// Machine facts and time helpers
// ---------------------------------------------------------------------------------------

/// Facts about the machine the numbers come from.
#[derive(Debug, Clone)]
struct Machine {
    nproc: usize,
    cpu_model: String,
    kernel: String,
    mem_total: String,
    profile: String,
}

impl Machine {
    /// Read `/proc` and the executable's location.
    fn probe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let mem_total = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".into());
        let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            kernel: if kernel.is_empty() {
                "unknown".into()
            } else {
                kernel
            },
            mem_total,
            profile: profile_name(),
        }
    }
}

/// The cargo profile directory name of this executable (`release`, `debug`, …).
fn profile_name() -> String {
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(Path::parent);
    let dir = match dir {
        Some(d) if d.file_name().is_some_and(|n| n == "deps") => d.parent(),
        other => other,
    };
    dir.and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if cfg!(debug_assertions) {
                "debug".into()
            } else {
                "release".into()
            }
        })
}

/// `docs/benchmarks.md` of the workspace.
fn docs_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("docs")
        .join("benchmarks.md")
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Date of a day count since 1970-01-01 (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Now as `YYYY-MM-DD HH:MM UTC`.
fn now_utc_string() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        sod / 3600,
        (sod % 3600) / 60
    )
}

/// Microseconds since the epoch of an RFC 3339 timestamp (`2026-11-23T15:34:37.123456Z`,
/// offsets `±HH:MM` accepted); `None` if malformed.
fn parse_rfc3339_micros(s: &str) -> Option<i64> {
    let (date, time) = s.split_once(['T', 't', ' '])?;
    let mut dp = date.splitn(3, '-');
    let y: i64 = dp.next()?.parse().ok()?;
    let mo: i64 = dp.next()?.parse().ok()?;
    let d: i64 = dp.next()?.parse().ok()?;
    let (clock, offset_s) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else {
        let i = time.rfind(['+', '-'])?;
        let (c, off) = time.split_at(i);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':')?;
        (
            c,
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60),
        )
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut tp = hms.splitn(3, ':');
    let h: i64 = tp.next()?.parse().ok()?;
    let mi: i64 = tp.next()?.parse().ok()?;
    let sec: i64 = tp.next()?.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut micros: i64 = 0;
    for b in frac.bytes().chain(std::iter::repeat(b'0')).take(6) {
        micros = micros * 10 + i64::from(b - b'0');
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    Some(secs * 1_000_000 + micros)
}

// ---------------------------------------------------------------------------------------
// Statistics and rendering
// ---------------------------------------------------------------------------------------

/// Milliseconds as f64.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Summary of a sample: median (mean of the middle two for even n), min, max, p90
/// (nearest rank).
#[derive(Debug, Clone, Copy)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
    p90: f64,
}

/// Summarise `xs` (empty → NaN everywhere).
fn summarize(xs: &[f64]) -> Summary {
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return Summary {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            p90: f64::NAN,
        };
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let rank = ((0.9 * n as f64).ceil() as usize).clamp(1, n);
    Summary {
        median,
        min: v[0],
        max: v[n - 1],
        p90: v[rank - 1],
    }
}

/// `PASS` or `MISS`.
fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// Format a per-tick number.
fn per_tick(x: f64) -> String {
    if x == x.trunc() {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

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
    let _ = writeln!(
        o,
        "- machine: {} CPUs (`nproc`), {}, kernel {}, {} RAM",
        m.nproc, m.cpu_model, m.kernel, m.mem_total
    );
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
    let mib = |kib: u64| kib as f64 / 1024.0;
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

/// The `cargo run …` command line that reproduces this run.
fn bench_command(args: &Args, m: &Machine) -> String {
    let profile_flag = match m.profile.as_str() {
        "debug" => String::new(),
        "release" => " --release".to_owned(),
        other => format!(" --profile {other}"),
    };
    let mut cmd = format!("cargo run{profile_flag} -p debvisor-tests --bin debvisor-bench");
    if !args.raw.is_empty() {
        cmd.push_str(" -- ");
        cmd.push_str(&args.raw.join(" "));
    }
    cmd
}

/// Print `report` and, unless `--no-write`, put it between `start` and `end` in
/// [`docs_path`]: how every figure set of the bench ends.
fn publish(args: &Args, start: &str, end: &str, report: &str) -> BenchResult<()> {
    println!("{report}");
    if args.write {
        let path = docs_path();
        write_marked(&path, start, end, report)?;
        eprintln!("debvisor-bench: wrote {}", path.display());
    }
    Ok(())
}

/// Put `section` between `start` and `end` in `path` (appended at the end when the markers are
/// missing; a missing or empty file gets [`DOCS_HEADER`] first), keeping everything outside.
fn write_marked(path: &Path, start: &str, end: &str, section: &str) -> BenchResult<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let block = format!("{start}\n{}\n{end}", section.trim_end());
    let text = match (existing.find(start), existing.find(end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{block}{}", &existing[..a], &existing[b + end.len()..])
        }
        _ if existing.trim().is_empty() => format!("{DOCS_HEADER}\n{block}\n"),
        _ => format!("{}\n\n{block}\n", existing.trim_end()),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Header of a new `docs/benchmarks.md`.
const DOCS_HEADER: &str = "# Benchmarks\n\n\
     Figures of DESIGN.md §7, measured by `debvisor-bench` \
     (`tests/src/bin/debvisor-bench.rs`) against the real `debvisord`, a private etcd 3.4 \
     (`/usr/bin/etcd`) on loopback and the libvirt test driver (`test:///default`).\n\n\
     Foundation figures: startup time to `run` (and where it goes, per stage), idle RSS \
     and CPU at a 5 s keepalive tick, and etcd requests per keepalive tick. Issue-4 \
     figures (root): converging managed networks from etcd, and nft apply cost per \
     network. Issue-3 figures: VM start latency and convergence, requests per tick with \
     VMs, real guests (root).\n\n\
     Run:\n\n\
     ```sh\n\
     cargo run --release -p debvisor-tests --bin debvisor-bench \
     # --runs 10 --idle-secs 60 --ticks 20 --networks 100 \
     [--networks-only | --skip-networks] --vms 1000 --guests 10 \
     [--vms-only | --skip-vms] [--ceph | --ceph-objects] [--no-write]\n\
     ```\n\n\
     The sections between the `bench:foundation`, `bench:networks`, `bench:vms`, `bench:ceph` \
     and `bench:ceph-objects` markers are rewritten by each run; keep other notes outside them.\n\n\
     Numbers are from a shared, noisy 2-core VM; compare ratios within one run.\n";

// ---------------------------------------------------------------------------------------
// Issue-3 figures: VMs (the Domain object), in their own file
// ---------------------------------------------------------------------------------------

#[path = "bench/vms.rs"]
mod bench_vms;

#[path = "bench/ceph.rs"]
mod bench_ceph;
#[path = "bench/ceph_objects.rs"]
mod bench_ceph_objects;

// ---------------------------------------------------------------------------------------
// Issue-4 figures: managed networks
// ---------------------------------------------------------------------------------------

/// Issue-4 figures of `debvisor-bench` (DESIGN.md §7, "time to converge N"): managed networks.
///
/// 1. **Convergence of N managed networks from etcd**, create then delete, on a standalone
///    node (so it is the primary: every network gets its VXLAN `dvvx<vni>`, bridge
///    `dvbr<vni>`, gateway address and a dnsmasq). A real `debvisord` and etcd run inside one
///    fresh network namespace per case; the N specs go in with as few transactions as etcd
///    allows (128 operations each). *Create* is timed from just before the first transaction
///    to the arrival of the last `networks/<vni>/status/<node>` put with `"state":"ready"` on
///    a watch opened before it (the watch thread stamps each event on arrival), plus the last
///    bridge seen by `ip -j link show type bridge` polled every 50 ms. *Delete* is one
///    `networks/` prefix delete, timed until no `dvbr*`/`dvvx*` link and no dnsmasq (`ip netns
///    pids` + `/proc/<pid>/comm`) is left and, with the firewall, no per-network nft chain
///    (the prefix delete removes the status keys itself, so they tell nothing). Run once
///    with `DEBVISOR_FIREWALL_ENABLED=false` and once with `true`. Peak RSS is the daemon's
///    `VmHWM` (and the largest `VmRSS` sampled every 50 ms); dnsmasq processes are counted
///    every 50 ms. The daemon's log lines give where the time goes (nft applies and their
///    `elapsed_ms`), `/proc/<pid>/stat` its CPU and that of its reaped children (nft).
/// 2. **nft apply cost of N networks' chains** through the firewall crate, inside a fresh
///    namespace (nft forked from a thread that entered it, as in the daemon, so no
///    `ip netns exec`): (a) one batch with all N networks from the base ruleset, median of 5;
///    (b) one apply per network with 1, 2, …, N networks (what re-applying on every network
///    change costs), total; (c) `ensure` with no change (the resync cost per tick); plus the
///    same batch and listing through a plain blocking `nft`, to separate nft's own time from
///    the driver's (its `wait_timeout` polls with a 1, 2, 4, … 20 ms backoff).
mod bench_networks {
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

    use super::{
        bench_command, clk_tck, ms, now_utc_string, num_field, parse_rfc3339_micros, publish,
        status_kib, str_field, summarize, Args, BenchResult, Machine,
    };

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
                let msg = match tokio::time::timeout(Duration::from_millis(100), s.message()).await
                {
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

    /// Busy and total ticks of all CPUs, from the `cpu` line of `/proc/stat`.
    fn machine_ticks() -> BenchResult<(u64, u64)> {
        let s = std::fs::read_to_string("/proc/stat")
            .map_err(|e| format!("reading /proc/stat: {e}"))?;
        let f: Vec<u64> = s
            .lines()
            .find_map(|l| l.strip_prefix("cpu "))
            .ok_or("/proc/stat: no cpu line")?
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let get = |i: usize| f.get(i).copied().unwrap_or(0);
        let idle = get(3) + get(4);
        let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
        Ok((busy, busy + idle))
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

    /// CPU ticks of a process: its own (utime + stime) and its reaped children's
    /// (cutime + cstime), from `/proc/<pid>/stat`.
    #[derive(Debug, Clone, Copy, Default)]
    struct Cpu {
        own: u64,
        children: u64,
    }

    impl Cpu {
        fn read(pid: u32) -> BenchResult<Cpu> {
            let path = format!("/proc/{pid}/stat");
            let s = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
            let rest = s
                .rfind(')')
                .map(|i| &s[i + 1..])
                .ok_or_else(|| format!("{path}: no ')' in {s:?}"))?;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // f[0] is field 3 (state): utime, stime, cutime, cstime are fields 14–17.
            let get = |idx: usize| -> BenchResult<u64> {
                let v = f
                    .get(idx)
                    .ok_or_else(|| format!("{path}: short line"))?
                    .parse::<i64>()
                    .map_err(|e| format!("{path}: field {}: {e}", idx + 3))?;
                Ok(u64::try_from(v).unwrap_or(0))
            };
            Ok(Cpu {
                own: get(11)? + get(12)?,
                children: get(13)? + get(14)?,
            })
        }

        /// Ticks spent since `before`.
        fn since(self, before: Cpu) -> Cpu {
            Cpu {
                own: self.own.saturating_sub(before.own),
                children: self.children.saturating_sub(before.children),
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
                let err =
                    |e: etcd_client::Error| debvisor_tests::HarnessError::State(e.to_string());
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
                let err =
                    |e: etcd_client::Error| debvisor_tests::HarnessError::State(e.to_string());
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
        let acl =
            |order, action, proto, source, dest, ports: Vec<PortRange>, d: Option<&str>| Acl {
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
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200))
                }
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

    /// MiB of kB.
    fn mib(kib: u64) -> f64 {
        kib as f64 / 1024.0
    }

    /// Percentile (nearest rank) of sorted durations.
    fn pct(sorted: &[Duration], p: f64) -> Option<Duration> {
        if sorted.is_empty() {
            return None;
        }
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        Some(sorted[rank - 1])
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
        let _ = writeln!(
            o,
            "- machine: {} CPUs (`nproc`), {}, kernel {}, {} RAM",
            m.nproc, m.cpu_model, m.kernel, m.mem_total
        );
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
                opt(pct(&c.create.status, 0.5)),
                opt(pct(&c.create.status, 0.9))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_samples() {
        let m = Metrics::parse(
            "# HELP x y\n\
             grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 7\n\
             grpc_server_handled_total{grpc_code=\"Unavailable\",grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 2\n\
             etcd_mvcc_put_total 3\n\
             weird{a=\"x\\\"}y\"} 1e3\n",
        );
        assert_eq!(
            m.sum("grpc_server_handled_total", &[("grpc_method", "Txn")]),
            Some(9.0)
        );
        assert_eq!(m.sum("etcd_mvcc_put_total", &[]), Some(3.0));
        assert_eq!(m.sum("weird", &[("a", "x\"}y")]), Some(1000.0));
        assert_eq!(m.sum("missing", &[]), None);
    }

    #[test]
    fn parses_timestamps() {
        let a = parse_rfc3339_micros("2026-11-23T15:34:37.123456Z");
        let b = parse_rfc3339_micros("2026-11-23T16:34:38.1+01:00");
        assert_eq!(b.zip(a).map(|(b, a)| b - a), Some(976_544));
        assert_eq!(parse_rfc3339_micros("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(parse_rfc3339_micros("garbage"), None);
    }

    #[test]
    fn summary_stats() {
        let s = summarize(&[5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
        assert_eq!((s.median, s.min, s.max, s.p90), (5.5, 1.0, 10.0, 9.0));
    }

    #[test]
    fn replaces_only_the_marked_section() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("b.md");
        std::fs::write(&p, format!("head\n{MARK_START}\nold\n{MARK_END}\ntail\n")).expect("write");
        write_marked(&p, MARK_START, MARK_END, "new\n").expect("write_marked");
        let s = std::fs::read_to_string(&p).expect("read");
        assert_eq!(s, format!("head\n{MARK_START}\nnew\n{MARK_END}\ntail\n"));
    }
}
