//! `--metrics-scrape` (issue 15): what a `GET /metrics` costs a real daemon as its VMs grow.
//!
//! One `debvisord` (the bench's profile) against a fresh etcd, owning 100 and then 1000 VMs
//! running on libvirt's test driver (written to etcd as `vms.rs` writes them). For each
//! size, once every VM runs and shows in a scrape, [`SCRAPES`] scrapes over HTTP one after
//! another, then an idle window of the same wall time without scrapes. Per scrape: bytes,
//! series (sample lines), wall time (p50/p95, from the bench's side of the socket), and the
//! daemon's CPU (utime + stime from `/proc/<pid>/stat`) over the scrapes minus the idle
//! window's, divided by the scrapes — the keepalive ticks run in both windows and cancel out.
//!
//! The etcd and the daemon are owned by locals (killed on drop, on every return path).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use debvisor_tests::{free_port, DaemonProcess, EtcdProcess};

use super::host::{bench_runtime, clk_tck, cpu_ticks, load_triple, RunStart};
use super::report::{bench_command, publish, Machine};
use super::stats::{ms, nearest_rank};
use super::vms::{connect, put_vms, spawn_daemon, StatusWatch, VmSpec, PHASE_BASE, PHASE_PER_VM};
use crate::{Args, BenchResult};

/// Start marker of the generated section in `docs/benchmarks.md`.
const MARK_START: &str = "<!-- bench:metrics-scrape:start -->";
/// End marker of the generated section in `docs/benchmarks.md`.
const MARK_END: &str = "<!-- bench:metrics-scrape:end -->";
/// The VM counts measured, in order (VMs are added, never removed).
const SIZES: [usize; 2] = [100, 1000];
/// Scrapes per size (enough for a window of several `/proc` ticks at 100 VMs).
const SCRAPES: usize = 200;
/// Node of the daemon.
const NODE: &str = "bench-metrics";
/// How long a scrape may take before the bench gives up.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// The figures of one size.
#[derive(Debug, Clone)]
struct SizeResult {
    vms: usize,
    /// Time until every VM ran and showed in a scrape.
    converge: Duration,
    bytes: usize,
    series: usize,
    /// Wall time per scrape (ms), in scrape order.
    wall_ms: Vec<f64>,
    /// Daemon CPU ticks over the scrapes and over the idle window of the same length.
    scrape_ticks: u64,
    idle_ticks: u64,
    /// Length of each window.
    window: Duration,
    clk_tck: u64,
}

impl SizeResult {
    /// Daemon CPU ms per scrape, net of the idle window (never below 0).
    fn cpu_ms_per_scrape(&self) -> f64 {
        let net = self.scrape_ticks.saturating_sub(self.idle_ticks) as f64;
        net * 1000.0 / self.clk_tck as f64 / self.wall_ms.len().max(1) as f64
    }

    /// The `q` quantile of the wall times (nearest rank).
    fn wall(&self, q: f64) -> f64 {
        let mut v = self.wall_ms.clone();
        v.sort_by(f64::total_cmp);
        nearest_rank(&v, q).unwrap_or(f64::NAN)
    }
}

/// Run the figure and publish it.
pub(crate) fn run(args: &Args, machine: &Machine) -> BenchResult<()> {
    let RunStart {
        started,
        load: load0,
        t0,
    } = RunStart::now();
    let rt = bench_runtime(1)?;
    let etcd = EtcdProcess::start().map_err(|e| format!("starting etcd: {e}"))?;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut d = spawn_daemon(&etcd, NODE, &[("DEBVISOR_METRICS_LISTEN", &addr)])?;
    let mut results = Vec::new();
    let mut vms: Vec<VmSpec> = Vec::new();
    let mut stopped = None;
    for size in SIZES {
        eprintln!(
            "debvisor-bench: [metrics-scrape] {size} VMs: writing and waiting until they run"
        );
        match measure_size(&rt, &etcd, &mut d, &addr, &mut vms, size) {
            Ok(r) => results.push(r),
            Err(e) if !results.is_empty() => {
                stopped = Some(format!("{size} VMs: {e}"));
                break;
            }
            Err(e) => return Err(e),
        }
    }
    drop(d);
    drop(etcd);
    rt.shutdown_timeout(Duration::from_secs(5));
    let report = render(
        args,
        machine,
        &started,
        &results,
        stopped.as_deref(),
        (&load0, &load_triple()),
        t0.elapsed(),
    );
    publish(args, MARK_START, MARK_END, &report)
}

/// Bring the daemon to `size` running VMs, then scrape and idle.
fn measure_size(
    rt: &tokio::runtime::Runtime,
    etcd: &EtcdProcess,
    d: &mut DaemonProcess,
    addr: &str,
    vms: &mut Vec<VmSpec>,
    size: usize,
) -> BenchResult<SizeResult> {
    let t0 = Instant::now();
    let new: Vec<VmSpec> = (vms.len()..size).map(|_| VmSpec::test_driver()).collect();
    let watch = StatusWatch::start(rt, etcd)?;
    let mut client = rt.block_on(connect(etcd))?;
    rt.block_on(put_vms(&mut client, &new, NODE))?;
    let want: HashSet<String> = new.iter().map(|v| v.uuid.clone()).collect();
    watch.wait_all(&want, d, PHASE_BASE + PHASE_PER_VM * size as u32)?;
    drop(watch);
    vms.extend(new);
    // Until the scrape shows them all running with their per-VM series (those follow the
    // keepalive tick's domain stats).
    let deadline = Instant::now() + PHASE_BASE;
    loop {
        let body = scrape(addr)?;
        let per_vm = body
            .lines()
            .filter(|l| l.starts_with("debvisor_vm_vcpus{"))
            .count();
        if running_in(&body) == Some(size as f64) && per_vm == size {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no scrape with {size} running VMs and their series within {PHASE_BASE:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let converge = t0.elapsed();

    let pid = d.pid();
    let tck = clk_tck()?;
    eprintln!("debvisor-bench: [metrics-scrape] {size} VMs: {SCRAPES} scrapes");
    let cpu0 = cpu_ticks(pid)?;
    let w0 = Instant::now();
    let mut wall_ms = Vec::with_capacity(SCRAPES);
    let mut bytes = 0;
    let mut series = 0;
    for _ in 0..SCRAPES {
        let t = Instant::now();
        let body = scrape(addr)?;
        wall_ms.push(ms(t.elapsed()));
        bytes = body.len();
        series = body
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count();
    }
    let window = w0.elapsed();
    let scrape_ticks = cpu_ticks(pid)?.saturating_sub(cpu0);
    eprintln!(
        "debvisor-bench: [metrics-scrape] {size} VMs: idle baseline of {:.1} s",
        window.as_secs_f64()
    );
    let cpu1 = cpu_ticks(pid)?;
    std::thread::sleep(window);
    let idle_ticks = cpu_ticks(pid)?.saturating_sub(cpu1);
    if !d.is_running() {
        return Err(format!(
            "debvisord exited during the scrapes\n{}",
            d.tail(30)
        ));
    }
    Ok(SizeResult {
        vms: size,
        converge,
        bytes,
        series,
        wall_ms,
        scrape_ticks,
        idle_ticks,
        window,
        clk_tck: tck,
    })
}

/// The value of `debvisor_vms{state="running"}` in a scrape.
fn running_in(body: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix("debvisor_vms{state=\"running\"} "))
        .and_then(|v| v.trim().parse().ok())
}

/// One `GET /metrics` over HTTP/1.1; the body (the status must be 200).
fn scrape(addr: &str) -> BenchResult<String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(SCRAPE_TIMEOUT))
        .map_err(|e| format!("{addr}: {e}"))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("GET /metrics from {addr}: {e}"))?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .map_err(|e| format!("reading /metrics from {addr}: {e}"))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("/metrics from {addr}: no end of headers"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!("/metrics from {addr}: {status}"));
    }
    Ok(body.to_owned())
}

/// The report section.
fn render(
    args: &Args,
    m: &Machine,
    started: &str,
    results: &[SizeResult],
    stopped: Option<&str>,
    load: (&str, &str),
    took: Duration,
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "### `/metrics` scrape cost, issue 15 ({started})\n");
    let _ = writeln!(o, "- command: `{}`", bench_command(args, m));
    let _ = writeln!(o, "- machine: {m}");
    let _ = writeln!(
        o,
        "- profile: `{}` (bench and `debvisord`); one daemon against a fresh etcd 3.4 on \
         loopback, VMs on libvirt `test:///default` owned by the daemon's node, keepalive \
         every 1 s; {SCRAPES} sequential scrapes over HTTP/1.1 per size",
        m.profile
    );
    let _ = writeln!(
        o,
        "- load (`cat /proc/loadavg`, 1/5/15 min) before: `{}`, after: `{}`; whole bench \
         {:.1} min (the machine is shared, other builds and tests ran meanwhile)\n",
        load.0,
        load.1,
        took.as_secs_f64() / 60.0
    );
    if let Some(e) = stopped {
        let _ = writeln!(
            o,
            "**Stopped early** (the sizes below are all there are): {e}\n"
        );
    }
    let _ = writeln!(
        o,
        "*CPU per scrape*: the daemon's utime + stime over the {SCRAPES} scrapes minus the same \
         over an idle window of the same wall time right after (keepalive ticks run in both), \
         divided by {SCRAPES}; `/proc` counts in ticks of 1/{} s, so the figure's resolution is \
         about {:.1} ms per scrape. *Wall*: connect → last byte, seen from the bench.\n",
        results.first().map_or(100, |r| r.clk_tck),
        results
            .first()
            .map_or(f64::NAN, |r| 1000.0 / r.clk_tck as f64 / SCRAPES as f64)
    );
    let _ = writeln!(
        o,
        "| VMs | bytes / scrape | series | CPU ms / scrape (net) | CPU ticks scrapes / idle | \
         window s | wall p50 ms | wall p95 ms | VMs running after |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {:.2} | {} / {} | {:.2} | {:.2} | {:.2} | {:.1} s |",
            r.vms,
            r.bytes,
            r.series,
            r.cpu_ms_per_scrape(),
            r.scrape_ticks,
            r.idle_ticks,
            r.window.as_secs_f64(),
            r.wall(0.5),
            r.wall(0.95),
            r.converge.as_secs_f64()
        );
    }
    if let [a, b] = results {
        let per_vm = (b.bytes as f64 - a.bytes as f64) / (b.vms as f64 - a.vms as f64);
        let series_per_vm = (b.series as f64 - a.series as f64) / (b.vms as f64 - a.vms as f64);
        let _ = writeln!(
            o,
            "\nFrom {} to {} VMs a scrape grows by {per_vm:.0} bytes and {series_per_vm:.1} series \
             per VM (docs/metrics.md lists the per-VM series).",
            a.vms, b.vms
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(scrape_ticks: u64, idle_ticks: u64) -> SizeResult {
        SizeResult {
            vms: 100,
            converge: Duration::from_secs(1),
            bytes: 1,
            series: 1,
            wall_ms: (1..=20).map(f64::from).collect(),
            scrape_ticks,
            idle_ticks,
            window: Duration::from_secs(1),
            clk_tck: 100,
        }
    }

    #[test]
    fn running_vms_are_read_from_a_scrape() {
        let body = "# TYPE debvisor_vms gauge\ndebvisor_vms{state=\"stopped\"} 0.0\n\
                    debvisor_vms{state=\"running\"} 100.0\n# EOF\n";
        assert_eq!(running_in(body), Some(100.0));
        assert_eq!(running_in("# EOF\n"), None);
    }

    #[test]
    fn cpu_is_net_of_idle_and_never_negative() {
        // 30 − 10 ticks of 10 ms over 20 scrapes: 10 ms each.
        assert!((result(30, 10).cpu_ms_per_scrape() - 10.0).abs() < 1e-9);
        assert_eq!(result(5, 10).cpu_ms_per_scrape(), 0.0);
        let r = result(0, 0);
        assert_eq!(r.wall(0.5), 10.0);
        assert_eq!(r.wall(0.95), 19.0);
    }
}
