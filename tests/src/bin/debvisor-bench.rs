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
//! Run with `cargo run --release -p debvisor-tests --bin debvisor-bench` (the daemon is built
//! in the profile of this executable). Tables go to stdout and, unless `--no-write`, into
//! `docs/benchmarks.md` between `<!-- bench:foundation:start -->` and
//! `<!-- bench:foundation:end -->`. The daemons' own log lines are echoed on stderr by the
//! harness.

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
    /// The arguments as given, for the report.
    raw: Vec<String>,
}

const USAGE: &str = "usage: debvisor-bench [--runs N] [--idle-secs S] [--ticks N] [--no-write]

  --runs N        startup runs (default 10)
  --idle-secs S   idle RSS/CPU window in seconds (default 60)
  --ticks N       keepalive ticks in the etcd request window (default 20)
  --no-write      print only; do not update docs/benchmarks.md";

/// Parse `std::env::args()`; `Ok(None)` for `--help`.
fn parse_args() -> BenchResult<Option<Args>> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut args = Args {
        runs: 10,
        idle_secs: 60,
        ticks: 20,
        write: true,
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

/// Run the three figures, print the report and (unless `--no-write`) write it to the docs.
/// Every spawned process is owned by a local and killed by its `Drop` on every return path.
fn run(args: &Args) -> BenchResult<()> {
    let machine = Machine::probe();
    // Build the daemon (same profile as this executable) before any timing starts.
    let daemon_bin = debvisor_tests::bin_path("debvisord");
    eprintln!("debvisor-bench: daemon binary {}", daemon_bin.display());
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

    let report = render(args, &machine, &started, &startup, &idle, &ticks);
    println!("{report}");
    if args.write {
        let path = docs_path();
        write_section(&path, &report)?;
        eprintln!("debvisor-bench: wrote {}", path.display());
    }
    Ok(())
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

/// Put `section` between the markers of `path`, creating the file with a header if missing
/// and keeping everything outside the markers.
fn write_section(path: &Path, section: &str) -> BenchResult<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let block = format!("{MARK_START}\n{}\n{MARK_END}", section.trim_end());
    let text = match (existing.find(MARK_START), existing.find(MARK_END)) {
        (Some(a), Some(b)) if a < b => {
            format!(
                "{}{block}{}",
                &existing[..a],
                &existing[b + MARK_END.len()..]
            )
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
     and CPU at a 5 s keepalive tick, and etcd requests per keepalive tick.\n\n\
     Run:\n\n\
     ```sh\n\
     cargo run --release -p debvisor-tests --bin debvisor-bench \
     # --runs 10 --idle-secs 60 --ticks 20 [--no-write]\n\
     ```\n\n\
     The section between the `bench:foundation` markers is rewritten by each run; keep \
     other notes outside them.\n\n\
     Numbers are from a shared, noisy 2-core VM; compare ratios within one run.\n";

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
        write_section(&p, "new\n").expect("write_section");
        let s = std::fs::read_to_string(&p).expect("read");
        assert_eq!(s, format!("head\n{MARK_START}\nnew\n{MARK_END}\ntail\n"));
    }
}
