//! `--scale-sim` (issue 17): what a cluster costs etcd, measured with many real daemons on one
//! machine, and extrapolated on paper to 500 nodes × 100 VMs.
//!
//! One 3-member etcd 3.4 (real processes, every member on loopback with its own ports,
//! [`EtcdProcess::loopback_cluster`]) and `--scale-nodes` real `debvisord` processes (the
//! bench's profile), each with its own node name, temp and state dir and metrics port,
//! clustered (the first three are coordinators), libvirt's test driver, firewall off and the
//! shipped keepalive interval and lease TTL (`KeepaliveConfig::default()`). Phases:
//!
//! 1. **baseline**: every node up with no VM, an idle window (a fifth of the idle window,
//!    at most 60 s): the per-node cost that does not depend on VMs.
//! 2. **idle**: `--scale-vms` VMs per node written through etcd (`put_vms`) and running,
//!    then `--scale-idle-mins` minutes without any request.
//! 3. **burst**: `--scale-burst` VM state changes, one `vms/<uuid>/state` put each (stop,
//!    then start again once every VM of the node set was stopped, …), spread round-robin
//!    over the nodes, written one after another as fast as etcd answers; the phase ends when
//!    every change's status came back on a watch.
//!
//! Per window: etcd revisions (transactions) and key versions (`etcd_mvcc_put_total`) per
//! second, watch events sent (`etcd_debugging_mvcc_events_total`, all members), DB size and
//! size in use (maintenance status of each member), the daemons' keepalive-transaction
//! histogram (summed over every daemon's `/metrics`), CPU of every daemon and member from
//! `/proc`, RSS at the end. Burst lag: the bench's wall clock just before a state put → the
//! owning daemon's `vm state changed` line (daemon clock, same host), and → the status
//! arriving on the bench's watch.
//!
//! Every process is owned by a local and killed by PID on drop (return, error or panic);
//! SIGINT/SIGTERM set a flag the waits check, so Ctrl-C also ends through the drops.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use debvisor_daemon::config::KeepaliveConfig;
use debvisor_tests::{free_port, DaemonBuilder, DaemonProcess, EtcdProcess};
use etcd_client::Client;

use super::clock::{epoch_micros, parse_rfc3339_micros};
use super::host::{
    bench_runtime, clk_tck, cpu_ticks, load_fmt, load_triple, loadavg, status_kib, RunStart,
};
use super::logs::str_field;
use super::report::{bench_command, publish, Machine};
use super::stats::{mib, ms};
use super::ticks::{fetch_metrics, Metrics};
use super::vms::{hist_delta, pct, put_vms, vm_key, HistDelta, Pct, StatusWatch, VmSpec};
use crate::{Args, BenchResult};

/// Start marker of the generated section in `docs/benchmarks.md`.
const MARK_START: &str = "<!-- bench:scale-sim:start -->";
/// End marker of the generated section in `docs/benchmarks.md`.
const MARK_END: &str = "<!-- bench:scale-sim:end -->";
/// etcd members.
const MEMBERS: usize = 3;
/// Coordinators among the nodes (the first ones).
const COORDINATORS: usize = 3;
/// How long all daemons together may take to reach `run`.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long VMs may take to reach the wanted status (write, then wait).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest baseline (0-VM) window.
const BASELINE_MAX: Duration = Duration::from_secs(60);
/// Poll period of the waits (interruption, daemons alive).
const POLL: Duration = Duration::from_secs(2);
/// etcd's default `--quota-backend-bytes` (2 GiB), which the bench's etcd runs with.
const ETCD_QUOTA_BYTES: f64 = 2.0 * 1024.0 * 1024.0 * 1024.0;
/// Retention (hours) of the compaction the extrapolation assumes an operator configures
/// (etcd 3.4 compacts nothing by default, and the daemons do not compact).
const COMPACTION_RETENTION_H: f64 = 1.0;
/// The cluster of the extrapolation: nodes and VMs per node.
const TARGET_NODES: f64 = 500.0;
/// VMs per node of the extrapolation.
const TARGET_VMS: f64 = 100.0;
/// The daemons' keepalive transaction histogram (docs/metrics.md).
const KEEPALIVE_HIST: &str = "debvisor_keepalive_txn_duration_seconds";

/// Set by SIGINT/SIGTERM: stop waiting and clean up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Route SIGINT and SIGTERM to [`INTERRUPTED`], so the bench returns through its drops
/// (also `--scale`'s: `scale_idle.rs`).
pub(crate) fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// `Err` once SIGINT/SIGTERM arrived.
pub(crate) fn check_interrupted() -> BenchResult<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted (SIGINT/SIGTERM): every started process is killed on the way out".into())
    } else {
        Ok(())
    }
}

/// The simulation's size, from the command line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScaleArgs {
    /// Daemons.
    pub(crate) nodes: usize,
    /// VMs per daemon.
    pub(crate) vms_per_node: usize,
    /// Idle window in minutes.
    pub(crate) idle_mins: u64,
    /// VM state changes of the burst.
    pub(crate) burst: usize,
}

/// One daemon of the simulation with its metrics address.
struct Node {
    d: DaemonProcess,
    metrics: SocketAddr,
}

/// One etcd member's counters at an instant.
#[derive(Debug, Clone, Default)]
struct MemberSnap {
    db_size: i64,
    db_in_use: i64,
    leader: bool,
    puts: Option<f64>,
    events: Option<f64>,
    cpu: u64,
}

/// The whole cluster's counters at an instant.
#[derive(Debug, Clone)]
struct Snap {
    at: Instant,
    revision: i64,
    members: Vec<MemberSnap>,
    /// Every daemon's `/metrics`, concatenated (sums add over daemons).
    daemons: Metrics,
    /// CPU ticks of each daemon.
    daemon_cpu: Vec<u64>,
    load1: f64,
}

/// What happened between two snapshots.
#[derive(Debug, Clone)]
struct Window {
    name: &'static str,
    nodes: usize,
    vms: usize,
    secs: f64,
    txns: f64,
    puts: Option<f64>,
    events: Option<f64>,
    /// DB size and size in use: growth over the window (leader's view) and at its end.
    db_growth: i64,
    db_end: i64,
    in_use_end: i64,
    keepalive: Option<HistDelta>,
    /// Daemon CPU over the window, % of one core: mean and max over daemons.
    daemon_cpu_mean: f64,
    daemon_cpu_max: f64,
    /// etcd CPU per member, % of one core, leader first.
    etcd_cpu: Vec<f64>,
    load: (f64, f64),
}

impl Window {
    fn between(
        name: &'static str,
        nodes: usize,
        vms: usize,
        a: &Snap,
        b: &Snap,
        tck: u64,
    ) -> Window {
        let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        let pct_core = |t: u64| t as f64 / tck as f64 / secs * 100.0;
        let delta = |f: fn(&MemberSnap) -> Option<f64>| -> Option<Vec<f64>> {
            a.members
                .iter()
                .zip(&b.members)
                .map(|(x, y)| Some(f(y)? - f(x)?))
                .collect::<Option<Vec<f64>>>()
        };
        // Every member applies every put: the busiest count (they agree) is the cluster's.
        let puts = delta(|m| m.puts).map(|v| v.into_iter().fold(0.0, f64::max));
        // Each member sends events to the watchers connected to it: the sum is the cluster's.
        let events = delta(|m| m.events).map(|v| v.into_iter().sum());
        let lead = |s: &Snap| {
            s.members
                .iter()
                .find(|m| m.leader)
                .or_else(|| s.members.first())
                .cloned()
                .unwrap_or_default()
        };
        let (la, lb) = (lead(a), lead(b));
        let cpus: Vec<f64> = a
            .daemon_cpu
            .iter()
            .zip(&b.daemon_cpu)
            .map(|(x, y)| pct_core(y.saturating_sub(*x)))
            .collect();
        let mut etcd_cpu: Vec<(bool, f64)> = a
            .members
            .iter()
            .zip(&b.members)
            .map(|(x, y)| (y.leader, pct_core(y.cpu.saturating_sub(x.cpu))))
            .collect();
        etcd_cpu.sort_by_key(|(leader, _)| !leader);
        Window {
            name,
            nodes,
            vms,
            secs,
            txns: (b.revision - a.revision) as f64,
            puts,
            events,
            db_growth: lb.db_size - la.db_size,
            db_end: lb.db_size,
            in_use_end: lb.db_in_use,
            keepalive: hist_delta(&a.daemons, &b.daemons, KEEPALIVE_HIST),
            daemon_cpu_mean: cpus.iter().sum::<f64>() / cpus.len().max(1) as f64,
            daemon_cpu_max: cpus.iter().copied().fold(0.0, f64::max),
            etcd_cpu: etcd_cpu.into_iter().map(|(_, c)| c).collect(),
            load: (a.load1, b.load1),
        }
    }

    /// Transactions (revisions) per second.
    fn txns_s(&self) -> f64 {
        self.txns / self.secs
    }

    /// Key versions written per second.
    fn puts_s(&self) -> Option<f64> {
        self.puts.map(|p| p / self.secs)
    }

    /// Watch events sent per second.
    fn events_s(&self) -> Option<f64> {
        self.events.map(|e| e / self.secs)
    }

    /// Watch events sent per key version written.
    fn fanout(&self) -> Option<f64> {
        match (self.events, self.puts) {
            (Some(e), Some(p)) if p > 0.0 => Some(e / p),
            _ => None,
        }
    }

    /// DB size growth per hour (bytes).
    fn db_per_hour(&self) -> f64 {
        self.db_growth as f64 / self.secs * 3600.0
    }

    /// CPU of the busiest member (% of a core).
    fn etcd_cpu_max(&self) -> f64 {
        self.etcd_cpu.iter().copied().fold(0.0, f64::max)
    }
}

/// The burst's per-change lags.
#[derive(Debug, Clone)]
struct Burst {
    window: Window,
    changes: usize,
    /// Write → the owning daemon's `vm state changed` line (ms).
    to_node: Pct,
    /// Write → the status on the bench's watch (ms).
    to_watch: Pct,
    /// Write round trips (ms).
    write_rtt: Pct,
    /// Changes whose daemon line was not found.
    missing_lines: usize,
}

/// Figures of the whole run.
#[derive(Debug, Clone)]
struct ScaleResult {
    nodes: usize,
    vms_per_node: usize,
    keepalive: (Duration, Duration),
    startup: Duration,
    converge: Duration,
    baseline: Window,
    idle: Window,
    burst: Option<Burst>,
    daemon_rss_kib: Vec<u64>,
    etcd_rss_kib: Vec<u64>,
    warns: usize,
    errs: usize,
}

/// Run the simulation and publish it.
pub(crate) fn run(args: &Args, machine: &Machine) -> BenchResult<()> {
    install_signal_handlers();
    let RunStart {
        started,
        load: load0,
        t0,
    } = RunStart::now();
    let sa = args.scale;
    let rt = bench_runtime(1)?;
    let res = simulate(&rt, sa);
    rt.shutdown_timeout(Duration::from_secs(5));
    let r = res?;
    let report = render(
        args,
        machine,
        &started,
        &r,
        (&load0, &load_triple()),
        t0.elapsed(),
    );
    publish(args, MARK_START, MARK_END, &report)
}

/// Start everything, run the phases, stop everything (the drops at the end of this function
/// and on every `?`).
fn simulate(rt: &tokio::runtime::Runtime, sa: ScaleArgs) -> BenchResult<ScaleResult> {
    let tck = clk_tck()?;
    let ka = KeepaliveConfig::default();
    // Build the daemon (the bench's profile) before anything is started or timed.
    let daemon_bin = debvisor_tests::bin_path("debvisord");
    eprintln!(
        "debvisor-bench: [scale] daemon binary {}",
        daemon_bin.display()
    );
    let token = format!("dv-scale-{}", std::process::id());
    eprintln!("debvisor-bench: [scale] starting a {MEMBERS}-member etcd on loopback");
    let etcd = EtcdProcess::loopback_cluster(MEMBERS, &token)
        .map_err(|e| format!("starting the {MEMBERS}-member etcd: {e}"))?;
    let endpoints: Vec<String> = etcd.iter().map(EtcdProcess::endpoint).collect();
    let mut clients = Vec::new();
    for ep in &endpoints {
        clients.push(
            rt.block_on(Client::connect([ep.as_str()], None))
                .map_err(|e| format!("connecting to {ep}: {e}"))?,
        );
    }

    let names: Vec<String> = (0..sa.nodes).map(|i| format!("sim{i:03}")).collect();
    let coordinators: Vec<&str> = names
        .iter()
        .take(COORDINATORS)
        .map(String::as_str)
        .collect();
    eprintln!(
        "debvisor-bench: [scale] starting {} daemons (keepalive {:?}, lease TTL {:?})",
        sa.nodes, ka.interval, ka.lease_ttl
    );
    let t_start = Instant::now();
    let mut nodes: Vec<Node> = Vec::new();
    for name in &names {
        check_interrupted()?;
        let port = free_port();
        let metrics: SocketAddr = ([127, 0, 0, 1], port).into();
        let d = DaemonBuilder::new(name)
            .binary(&daemon_bin)
            .endpoints(&endpoints)
            .clustered(&coordinators)
            .env("DEBVISOR_METRICS_LISTEN", &metrics.to_string())
            .env("DEBVISOR_FIREWALL_ENABLED", "false")
            .env(
                "DEBVISOR_KEEPALIVE_INTERVAL",
                &format!("{}ms", ka.interval.as_millis()),
            )
            .env(
                "DEBVISOR_KEEPALIVE_LEASE_TTL",
                &format!("{}ms", ka.lease_ttl.as_millis()),
            )
            .spawn()
            .map_err(|e| format!("spawning debvisord {name}: {e}"))?;
        nodes.push(Node { d, metrics });
    }
    let deadline = t_start + RUN_TIMEOUT;
    for n in &mut nodes {
        check_interrupted()?;
        let left = deadline.saturating_duration_since(Instant::now());
        n.d.wait_run(left.max(Duration::from_secs(1)))
            .map_err(|e| format!("debvisord {} did not reach run: {e}", n.d.node()))?;
    }
    let startup = t_start.elapsed();
    eprintln!(
        "debvisor-bench: [scale] {} daemons in run after {:.1} s",
        sa.nodes,
        startup.as_secs_f64()
    );
    sleep_checked(ka.interval * 3, &mut nodes)?;

    let idle_len = Duration::from_secs(sa.idle_mins * 60);
    let base_len = (idle_len / 5).max(ka.interval * 5).min(BASELINE_MAX);
    eprintln!(
        "debvisor-bench: [scale] baseline: {} nodes, no VM, {:.0} s",
        sa.nodes,
        base_len.as_secs_f64()
    );
    let s0 = snapshot(rt, &mut clients, &etcd, &mut nodes)?;
    sleep_checked(base_len, &mut nodes)?;
    let s1 = snapshot(rt, &mut clients, &etcd, &mut nodes)?;
    let baseline = Window::between("baseline (no VM)", sa.nodes, 0, &s0, &s1, tck);

    // VMs, node by node, then wait until all run.
    let total = sa.nodes * sa.vms_per_node;
    eprintln!("debvisor-bench: [scale] writing {total} VMs and waiting until they run");
    let t_conv = Instant::now();
    let watch = StatusWatch::start_at(rt, &endpoints[0])?;
    let mut vms: Vec<(VmSpec, usize)> = Vec::with_capacity(total);
    let mut writer = clients[0].clone();
    for (i, name) in names.iter().enumerate() {
        let specs: Vec<VmSpec> = (0..sa.vms_per_node)
            .map(|_| VmSpec::test_driver())
            .collect();
        rt.block_on(put_vms(&mut writer, &specs, name))?;
        vms.extend(specs.into_iter().map(|s| (s, i)));
    }
    let want: Vec<(String, &'static str, Instant)> = vms
        .iter()
        .map(|(v, _)| (v.uuid.clone(), "running", t_conv))
        .collect();
    wait_status(&watch, &want, &mut nodes)?;
    let converge = t_conv.elapsed();
    drop(watch);
    eprintln!(
        "debvisor-bench: [scale] {total} VMs running after {:.1} s; idle for {} min",
        converge.as_secs_f64(),
        sa.idle_mins
    );
    // Let the start-up writes and their stats settle before the idle window.
    sleep_checked(ka.interval * 3, &mut nodes)?;
    let s2 = snapshot(rt, &mut clients, &etcd, &mut nodes)?;
    sleep_checked(idle_len, &mut nodes)?;
    let s3 = snapshot(rt, &mut clients, &etcd, &mut nodes)?;
    let idle = Window::between("idle", sa.nodes, sa.vms_per_node, &s2, &s3, tck);

    let burst = if sa.burst > 0 && total > 0 {
        Some(run_burst(
            rt,
            &mut clients,
            &etcd,
            &mut nodes,
            &vms,
            sa.burst,
            tck,
        )?)
    } else {
        None
    };

    let mut daemon_rss_kib = Vec::new();
    for n in &nodes {
        daemon_rss_kib.push(status_kib(n.d.pid(), "VmRSS")?);
    }
    let mut etcd_rss_kib = Vec::new();
    for m in &etcd {
        let pid = m.pid().ok_or("an etcd member is not running")?;
        etcd_rss_kib.push(status_kib(pid, "VmRSS")?);
    }
    let (mut warns, mut errs) = (0, 0);
    for n in &nodes {
        for v in n.d.json_lines() {
            match str_field(&v, "level") {
                Some("WARN") => warns += 1,
                Some("ERROR") => errs += 1,
                _ => {}
            }
        }
    }
    eprintln!(
        "debvisor-bench: [scale] stopping {} daemons and etcd",
        nodes.len()
    );
    drop(nodes);
    drop(clients);
    drop(etcd);
    Ok(ScaleResult {
        nodes: sa.nodes,
        vms_per_node: sa.vms_per_node,
        keepalive: (ka.interval, ka.lease_ttl),
        startup,
        converge,
        baseline,
        idle,
        burst,
        daemon_rss_kib,
        etcd_rss_kib,
        warns,
        errs,
    })
}

/// The burst: `changes` state puts round-robin over the nodes' VMs, stop first, then start.
fn run_burst(
    rt: &tokio::runtime::Runtime,
    clients: &mut [Client],
    etcd: &[EtcdProcess],
    nodes: &mut [Node],
    vms: &[(VmSpec, usize)],
    changes: usize,
    tck: u64,
) -> BenchResult<Burst> {
    let n_nodes = nodes.len();
    // Round-robin over nodes: the k-th VM of node 0, node 1, …, then the (k+1)-th.
    let mut by_node: Vec<Vec<&VmSpec>> = vec![Vec::new(); n_nodes];
    for (v, i) in vms {
        by_node[*i].push(v);
    }
    let per_node = by_node.iter().map(Vec::len).max().unwrap_or(0);
    let order: Vec<&VmSpec> = (0..per_node)
        .flat_map(|k| by_node.iter().filter_map(move |l| l.get(k).copied()))
        .collect();
    eprintln!("debvisor-bench: [scale] burst of {changes} VM state changes over {n_nodes} nodes");
    let endpoint = etcd.first().ok_or("no etcd member")?.endpoint();
    let watch = StatusWatch::start_at(rt, &endpoint)?;
    let mut writer = clients.first().ok_or("no etcd client")?.clone();
    let b0 = snapshot(rt, clients, etcd, nodes)?;
    let mut to_watch = Vec::new();
    let mut rtts = Vec::new();
    // (uuid, wanted status, wall µs of the write)
    let mut written: Vec<(String, &'static str, i64)> = Vec::new();
    let mut done = 0;
    let mut round = 0;
    while done < changes {
        check_interrupted()?;
        let (state, status) = if round % 2 == 0 {
            ("stop", "stopped")
        } else {
            ("start", "running")
        };
        let take = (changes - done).min(order.len());
        let mut want = Vec::with_capacity(take);
        let mut at_of: HashMap<String, Instant> = HashMap::new();
        for v in order.iter().take(take) {
            let key = vm_key(&v.uuid, "state");
            let wall = epoch_micros(SystemTime::now());
            let at = Instant::now();
            rt.block_on(writer.put(key.as_str(), state, None))
                .map_err(|e| format!("put {key} = {state}: {e}"))?;
            rtts.push(ms(at.elapsed()));
            want.push((v.uuid.clone(), status, at));
            at_of.insert(v.uuid.clone(), at);
            written.push((v.uuid.clone(), status, wall));
        }
        let seen = wait_status(&watch, &want, nodes)?;
        for (uuid, t) in seen {
            if let Some(w) = at_of.get(&uuid) {
                to_watch.push(ms(t.duration_since(*w)));
            }
        }
        done += take;
        round += 1;
    }
    drop(watch);
    let b1 = snapshot(rt, clients, etcd, nodes)?;
    let window = Window::between("burst", n_nodes, vms.len() / n_nodes.max(1), &b0, &b1, tck);
    // The daemons' lines of each change: first `vm state changed` to the wanted status at or
    // after the write (a change's VM is written once per round; rounds follow each other).
    let mut lines: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for n in nodes.iter() {
        for v in n.d.json_lines() {
            if str_field(&v, "message") != Some("vm state changed") {
                continue;
            }
            let (Some(uuid), Some(to), Some(ts)) = (
                str_field(&v, "uuid"),
                str_field(&v, "to"),
                str_field(&v, "timestamp").and_then(parse_rfc3339_micros),
            ) else {
                continue;
            };
            lines
                .entry(uuid.to_owned())
                .or_default()
                .push((ts, to.to_owned()));
        }
    }
    let mut to_node = Vec::new();
    let mut missing = 0;
    for (uuid, status, wall) in &written {
        let hit = lines.get(uuid).and_then(|l| {
            l.iter()
                .filter(|(ts, to)| *ts >= *wall && to == status)
                .map(|(ts, _)| *ts)
                .min()
        });
        match hit {
            Some(ts) => to_node.push((ts - wall) as f64 / 1000.0),
            None => missing += 1,
        }
    }
    Ok(Burst {
        window,
        changes: written.len(),
        to_node: pct(&to_node),
        to_watch: pct(&to_watch),
        write_rtt: pct(&rtts),
        missing_lines: missing,
    })
}

/// Sleep `d` in [`POLL`] steps, failing on SIGINT/SIGTERM or when a daemon exited.
fn sleep_checked(d: Duration, nodes: &mut [Node]) -> BenchResult<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        check_alive(nodes)?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(POLL));
    }
}

/// `Err` with its log tail when a daemon has exited.
fn check_alive(nodes: &mut [Node]) -> BenchResult<()> {
    for n in nodes.iter_mut() {
        if !n.d.is_running() {
            return Err(format!("debvisord {} exited\n{}", n.d.node(), n.d.tail(40)));
        }
    }
    Ok(())
}

/// Read every counter of the run: members' status and `/metrics`, daemons' `/metrics`, CPU.
fn snapshot(
    rt: &tokio::runtime::Runtime,
    clients: &mut [Client],
    etcd: &[EtcdProcess],
    nodes: &mut [Node],
) -> BenchResult<Snap> {
    check_alive(nodes)?;
    let at = Instant::now();
    let mut members = Vec::new();
    let mut revision = 0;
    for (c, m) in clients.iter_mut().zip(etcd) {
        let st = rt
            .block_on(c.status())
            .map_err(|e| format!("status of etcd member {}: {e}", m.name()))?;
        let header = st
            .header()
            .ok_or_else(|| format!("status of etcd member {}: no header", m.name()))?;
        revision = revision.max(header.revision());
        let em = fetch_metrics(m.client_addr())?;
        let pid = m
            .pid()
            .ok_or_else(|| format!("etcd member {} is not running", m.name()))?;
        members.push(MemberSnap {
            db_size: st.db_size(),
            db_in_use: st.raft_used_db_size(),
            leader: st.leader() == header.member_id(),
            puts: em.sum("etcd_mvcc_put_total", &[]),
            events: em.sum("etcd_debugging_mvcc_events_total", &[]),
            cpu: cpu_ticks(pid)?,
        });
    }
    let mut daemons = Metrics::default();
    let mut daemon_cpu = Vec::with_capacity(nodes.len());
    for n in nodes.iter() {
        let m = fetch_metrics(n.metrics)
            .map_err(|e| format!("/metrics of debvisord {}: {e}", n.d.node()))?;
        daemons.series.extend(m.series);
        daemon_cpu.push(cpu_ticks(n.d.pid())?);
    }
    Ok(Snap {
        at,
        revision,
        members,
        daemons,
        daemon_cpu,
        load1: loadavg(),
    })
}

/// Wait until each `(uuid, state, since)` of `want` had a status `state` arriving on
/// `watch` after `since`; the arrival of each, by uuid. Fails after [`CONVERGE_TIMEOUT`],
/// on SIGINT/SIGTERM, or when a daemon exits.
fn wait_status(
    watch: &StatusWatch,
    want: &[(String, &'static str, Instant)],
    nodes: &mut [Node],
) -> BenchResult<HashMap<String, Instant>> {
    let pending: HashMap<&str, (&str, Instant)> = want
        .iter()
        .map(|(u, s, t)| (u.as_str(), (*s, *t)))
        .collect();
    let mut got: HashMap<String, Instant> = HashMap::new();
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let mut last_check = Instant::now();
    while got.len() < pending.len() {
        check_interrupted()?;
        let now = Instant::now();
        if now >= deadline {
            let missing: HashSet<&str> = pending
                .keys()
                .filter(|u| !got.contains_key(**u))
                .copied()
                .collect();
            return Err(format!(
                "only {} of {} VMs reached their status within {CONVERGE_TIMEOUT:?} \
                     (e.g. {:?})",
                got.len(),
                pending.len(),
                missing.iter().take(3).collect::<Vec<_>>()
            ));
        }
        if now.duration_since(last_check) >= POLL {
            check_alive(nodes)?;
            last_check = now;
        }
        if let Some((uuid, state, at)) = watch.next(Duration::from_millis(200))? {
            if let Some((s, since)) = pending.get(uuid.as_str()) {
                if state == *s && at >= *since {
                    got.entry(uuid).or_insert(at);
                }
            }
        }
    }
    Ok(got)
}

// ---------------------------------------------------------------------------------------
// Extrapolation
// ---------------------------------------------------------------------------------------

/// Per-node costs as a line in VMs per node (`base` + `per_vm` × VMs), from the baseline
/// and idle windows.
#[derive(Debug, Clone, Copy)]
struct Linear {
    base: f64,
    per_vm: f64,
}

impl Linear {
    /// The line through (0, `at0`) and (`vms`, `at_vms`) (per node).
    fn fit(at0: f64, at_vms: f64, vms: usize) -> Linear {
        let per_vm = if vms == 0 {
            0.0
        } else {
            ((at_vms - at0) / vms as f64).max(0.0)
        };
        Linear { base: at0, per_vm }
    }

    fn at(&self, vms: f64) -> f64 {
        self.base + self.per_vm * vms
    }
}

/// The paper cluster: what [`TARGET_NODES`] × [`TARGET_VMS`] costs etcd with the measured
/// per-node costs, and which limit comes first.
#[derive(Debug, Clone)]
struct Extrapolation {
    txns_s: f64,
    puts_s: f64,
    /// Key versions per second per node at the measured and target VMs.
    puts_node: Linear,
    bytes_per_put: f64,
    db_per_hour: f64,
    hours_to_quota: f64,
    /// Watch events per key version at the target (fan-out scaled by nodes).
    fanout: f64,
    events_s: f64,
    /// Busiest member's CPU in cores: measured; at the target if all of it scaled with
    /// writes (lower bound) and with events (upper bound).
    cores_now: f64,
    cores_low: f64,
    cores_high: f64,
    cores_available: f64,
}

/// Extrapolate from the baseline and idle windows (`None` when etcd's counters are missing).
fn extrapolate(r: &ScaleResult, cores_available: usize) -> Option<Extrapolation> {
    let (b, i) = (&r.baseline, &r.idle);
    let n = r.nodes as f64;
    let puts_node = Linear::fit(b.puts_s()? / n, i.puts_s()? / n, r.vms_per_node);
    let txns_node = Linear::fit(b.txns_s() / n, i.txns_s() / n, r.vms_per_node);
    let puts_s = puts_node.at(TARGET_VMS) * TARGET_NODES;
    let txns_s = txns_node.at(TARGET_VMS) * TARGET_NODES;
    let idle_puts = i.puts?;
    let bytes_per_put = if idle_puts > 0.0 {
        i.db_growth.max(0) as f64 / idle_puts
    } else {
        f64::NAN
    };
    let db_per_hour = puts_s * 3600.0 * bytes_per_put;
    let hours_to_quota = ETCD_QUOTA_BYTES / db_per_hour;
    let fanout = i.fanout()? * TARGET_NODES / n;
    let events_s = puts_s * fanout;
    let cores_now = i.etcd_cpu_max() / 100.0;
    let grow_puts = puts_s / i.puts_s()?.max(1e-9);
    let grow_events = events_s / i.events_s()?.max(1e-9);
    Some(Extrapolation {
        txns_s,
        puts_s,
        puts_node,
        bytes_per_put,
        db_per_hour,
        hours_to_quota,
        fanout,
        events_s,
        cores_now,
        cores_low: cores_now * grow_puts,
        cores_high: cores_now * grow_events.max(grow_puts),
        cores_available: cores_available as f64,
    })
}

/// The first limit the paper cluster hits, as a sentence computed from `x`.
fn first_limit(x: &Extrapolation) -> String {
    if x.cores_low > x.cores_available {
        format!(
            "**etcd write rate**: {:.0} key versions/s ({:.0} transactions/s) would keep the \
             busiest member at ≥ {:.1} cores even if delivering them to watches cost nothing \
             extra — more than the {:.0} cores of a machine like this one; it is hit at once, \
             before the DB quota ({:.1} h) matters",
            x.puts_s, x.txns_s, x.cores_low, x.cores_available, x.hours_to_quota
        )
    } else if x.cores_high > x.cores_available {
        format!(
            "**watch fan-out**: the writes alone fit ({:.1} cores for {:.0} key versions/s), \
             but every key version goes to ≈{:.0} watches ({:.0} events/s), up to {:.1} cores \
             of the busiest member — more than the {:.0} cores of a machine like this one; hit \
             at once, before the DB quota ({:.1} h) matters",
            x.cores_low,
            x.puts_s,
            x.fanout,
            x.events_s,
            x.cores_high,
            x.cores_available,
            x.hours_to_quota
        )
    } else {
        format!(
            "**DB size**: etcd's CPU fits ({:.1}–{:.1} of {:.0} cores), but without compaction \
             {:.1} GiB/h of history reach the 2 GiB quota after {:.1} h (then etcd raises \
             NOSPACE and refuses writes)",
            x.cores_low,
            x.cores_high,
            x.cores_available,
            x.db_per_hour / 1024.0 / 1024.0 / 1024.0,
            x.hours_to_quota
        )
    }
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

/// `x` with a fixed number of decimals, `n/a` for `None` or non-finite.
fn num(x: Option<f64>, decimals: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "n/a".into(),
    }
}

/// Bytes as MiB with two decimals (signed).
fn mib_bytes(b: f64) -> String {
    format!("{:.2}", b / 1024.0 / 1024.0)
}

/// The table row of one window.
fn window_row(w: &Window) -> String {
    let ka = |f: fn(&HistDelta) -> f64| num(w.keepalive.as_ref().map(f), 1);
    format!(
        "| {} | {:.0} | {} / {} | {:.1} | {} | {} | {} | {} | {} / {} | {} ≤ {} ms / ≤ {} ms | \
         {:.2} / {:.2} | {} | {} / {} |",
        w.name,
        w.secs,
        w.nodes,
        w.vms,
        w.txns_s(),
        num(w.puts_s(), 1),
        num(w.events_s(), 0),
        num(w.fanout(), 1),
        mib_bytes(w.db_per_hour()),
        mib_bytes(w.db_end as f64),
        mib_bytes(w.in_use_end as f64),
        ka(|h| h.mean_ms),
        ka(|h| h.p50_le_ms),
        ka(|h| h.p99_le_ms),
        w.daemon_cpu_mean,
        w.daemon_cpu_max,
        w.etcd_cpu
            .iter()
            .map(|c| format!("{c:.1}"))
            .collect::<Vec<_>>()
            .join(" / "),
        load_fmt(w.load.0),
        load_fmt(w.load.1),
    )
}

/// The report section.
fn render(
    args: &Args,
    m: &Machine,
    started: &str,
    r: &ScaleResult,
    load: (&str, &str),
    took: Duration,
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "### Scale: {}-node simulation ({started})\n", r.nodes);
    let _ = writeln!(o, "- command: `{}`", bench_command(args, m));
    let _ = writeln!(o, "- machine: {m}");
    let _ = writeln!(
        o,
        "- setup: {} real `debvisord` (`{}` profile), clustered (first {} coordinators), \
         libvirt `test:///default`, {} VMs each ({} in all), firewall off, shipped keepalive \
         (interval {:?}, lease TTL {:?}); one {MEMBERS}-member etcd 3.4 (real processes on \
         loopback, etcd defaults: no auto-compaction, 2 GiB quota); daemons in `run` after \
         {:.1} s, all VMs running {:.1} s after their write",
        r.nodes,
        m.profile,
        COORDINATORS.min(r.nodes),
        r.vms_per_node,
        r.nodes * r.vms_per_node,
        r.keepalive.0,
        r.keepalive.1,
        r.startup.as_secs_f64(),
        r.converge.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "- load (`cat /proc/loadavg`, 1/5/15 min) before: `{}`, after: `{}`; whole bench \
         {:.1} min; the machine is shared (other builds and tests ran meanwhile) and all {} \
         daemons and the 3 members share its {} CPUs\n",
        load.0,
        load.1,
        took.as_secs_f64() / 60.0,
        r.nodes,
        m.nproc
    );
    let _ = writeln!(
        o,
        "*txn/s*: etcd revisions per second (one per write transaction); *key versions/s*: \
         `etcd_mvcc_put_total`; *watch events/s*: `etcd_debugging_mvcc_events_total` summed \
         over the members, and per key version (fan-out); *DB*: the leader's `dbSize` growth \
         per hour over the window, and `dbSize` / `dbSizeInUse` at its end; *keepalive txn*: \
         `{KEEPALIVE_HIST}` summed over every daemon, mean and the bucket bounds holding p50 \
         and p99; CPU in % of one core from `/proc/<pid>/stat` (daemons: mean / max; etcd: \
         leader first); *load*: 1-min load at the window's start / end.\n"
    );
    let _ = writeln!(
        o,
        "| window | s | nodes / VMs each | txn/s | key versions/s | watch events/s | events \
         per version | DB MiB/h | DB / in use MiB | keepalive txn mean, p50 / p99 | daemon CPU \
         % mean / max | etcd CPU % | load |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let _ = writeln!(o, "{}", window_row(&r.baseline));
    let _ = writeln!(o, "{}", window_row(&r.idle));
    if let Some(b) = &r.burst {
        let _ = writeln!(o, "{}", window_row(&b.window));
    }
    let rss = |v: &[u64]| -> (f64, f64) {
        let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
        (mib(mean as u64), mib(v.iter().copied().max().unwrap_or(0)))
    };
    let (dm, dx) = rss(&r.daemon_rss_kib);
    let _ = writeln!(
        o,
        "\nRSS at the end: daemons {dm:.1} MiB mean, {dx:.1} MiB max ({:.0} MiB together); \
         etcd members {} MiB. Daemon log lines: {} WARN, {} ERROR over the run.",
        mib(r.daemon_rss_kib.iter().sum()),
        r.etcd_rss_kib
            .iter()
            .map(|k| format!("{:.0}", mib(*k)))
            .collect::<Vec<_>>()
            .join(" / "),
        r.warns,
        r.errs
    );
    if let Some(b) = &r.burst {
        let _ = writeln!(
            o,
            "\nBurst: {} state changes (one `vms/<uuid>/state` put each; stop, then start when \
             the burst is larger than the VM count), round-robin over {} nodes, written one \
             after another in {:.1} s (put round trip p50 {:.1} ms, p99 {:.1} ms).\n",
            b.changes, r.nodes, b.window.secs, b.write_rtt.p50, b.write_rtt.p99
        );
        let _ = writeln!(o, "| reactor lag (ms) | n | p50 | p90 | p99 | max |");
        let _ = writeln!(o, "|---|---|---|---|---|---|");
        for (name, p) in [
            (
                "write → owning node's `vm state changed` line (daemon clock)",
                &b.to_node,
            ),
            ("write → status back on a watch (bench clock)", &b.to_watch),
        ] {
            let _ = writeln!(
                o,
                "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                p.n, p.p50, p.p90, p.p99, p.max
            );
        }
        if b.missing_lines > 0 {
            let _ = writeln!(
                o,
                "\n{} changes had no `vm state changed` line at or after their write.",
                b.missing_lines
            );
        }
    }
    match extrapolate(r, m.nproc) {
        Some(x) => {
            let _ = writeln!(
                o,
                "\n**Extrapolation to {TARGET_NODES:.0} nodes × {TARGET_VMS:.0} VMs** (on paper, \
                 from the measured per-node costs, linear in VMs per node between the baseline \
                 and the idle window: {:.2} + {:.3} × VMs key versions/s per node):\n",
                x.puts_node.base, x.puts_node.per_vm
            );
            let _ = writeln!(
                o,
                "| figure | {} × {} measured | {TARGET_NODES:.0} × {TARGET_VMS:.0} |",
                r.nodes, r.vms_per_node
            );
            let _ = writeln!(o, "|---|---|---|");
            let i = &r.idle;
            let _ = writeln!(
                o,
                "| etcd transactions/s | {:.1} | {:.0} |",
                i.txns_s(),
                x.txns_s
            );
            let _ = writeln!(
                o,
                "| key versions/s | {} | {:.0} |",
                num(i.puts_s(), 1),
                x.puts_s
            );
            let _ = writeln!(
                o,
                "| DB growth (no compaction) | {} MiB/h ({:.0} B per key version) | {:.1} GiB/h → \
                 2 GiB quota after {:.1} h |",
                mib_bytes(i.db_per_hour()),
                x.bytes_per_put,
                x.db_per_hour / 1024.0 / 1024.0 / 1024.0,
                x.hours_to_quota
            );
            let retained = x.db_per_hour * COMPACTION_RETENTION_H;
            let _ = writeln!(
                o,
                "| history kept with `--auto-compaction-retention={COMPACTION_RETENTION_H:.0}h` | \
                 {} MiB | {:.1} GiB ({}) |",
                mib_bytes(i.db_per_hour() * COMPACTION_RETENTION_H),
                retained / 1024.0 / 1024.0 / 1024.0,
                if retained > ETCD_QUOTA_BYTES {
                    "over the 2 GiB quota even compacted hourly"
                } else {
                    "under the 2 GiB quota, if compacted and defragmented"
                }
            );
            let _ = writeln!(
                o,
                "| watch events per key version | {} | {:.0} (scaled by nodes: every node \
                 watches `nodes/`, where the keepalive writes, and `vms/`) |",
                num(i.fanout(), 1),
                x.fanout
            );
            let _ = writeln!(
                o,
                "| watch events/s | {} | {:.0} |",
                num(i.events_s(), 0),
                x.events_s
            );
            let _ = writeln!(
                o,
                "| busiest etcd member CPU (cores) | {:.2} | {:.1} (all cost per write) – {:.1} \
                 (all cost per event) |",
                x.cores_now, x.cores_low, x.cores_high
            );
            let _ = writeln!(
                o,
                "\nFirst limit at {TARGET_NODES:.0} × {TARGET_VMS:.0}: {}.",
                first_limit(&x)
            );
        }
        None => {
            let _ = writeln!(
                o,
                "\nNo extrapolation: etcd did not expose `etcd_mvcc_put_total` / \
                 `etcd_debugging_mvcc_events_total`."
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(puts: f64, events: f64, db: i64, cpu: f64) -> Window {
        Window {
            name: "w",
            nodes: 10,
            vms: 20,
            secs: 100.0,
            txns: 100.0,
            puts: Some(puts),
            events: Some(events),
            db_growth: db,
            db_end: db,
            in_use_end: db,
            keepalive: None,
            daemon_cpu_mean: 1.0,
            daemon_cpu_max: 2.0,
            etcd_cpu: vec![cpu, cpu / 2.0],
            load: (1.0, 1.0),
        }
    }

    fn result(base: Window, idle: Window) -> ScaleResult {
        ScaleResult {
            nodes: 10,
            vms_per_node: 20,
            keepalive: (Duration::from_secs(2), Duration::from_secs(6)),
            startup: Duration::from_secs(1),
            converge: Duration::from_secs(1),
            baseline: base,
            idle,
            burst: None,
            daemon_rss_kib: vec![1024; 10],
            etcd_rss_kib: vec![1024; 3],
            warns: 0,
            errs: 0,
        }
    }

    #[test]
    fn extrapolation_follows_the_measured_line() {
        // 10 nodes: baseline 1 key version/s per node, idle 5 per node with 20 VMs →
        // 0.2 per VM; at 100 VMs 21 per node, 500 nodes → 10 500/s.
        let r = result(
            window(1000.0, 10_000.0, 0, 10.0),
            window(5000.0, 50_000.0, 5_000_000, 10.0),
        );
        let x = extrapolate(&r, 2).expect("counters present");
        assert!((x.puts_s - 10_500.0).abs() < 1e-6);
        // 1000 B per key version.
        assert!((x.bytes_per_put - 1000.0).abs() < 1e-9);
        // Fan-out 10 at 10 nodes → 500 at 500 nodes.
        assert!((x.fanout - 500.0).abs() < 1e-9);
        assert!(x.cores_low <= x.cores_high);
        let text = first_limit(&x);
        assert!(text.contains("write rate"), "{text}");
    }

    #[test]
    fn a_light_load_names_the_db_quota() {
        let r = result(window(1.0, 1.0, 0, 0.0001), window(2.0, 2.0, 2000, 0.0001));
        let x = extrapolate(&r, 2).expect("counters present");
        assert!(first_limit(&x).contains("DB size"), "{}", first_limit(&x));
    }

    #[test]
    fn windows_sum_events_and_take_the_busiest_put_count() {
        let snap = |puts: f64, events: f64, rev: i64, secs: u64| Snap {
            at: Instant::now() + Duration::from_secs(secs),
            revision: rev,
            members: (0..3)
                .map(|i| MemberSnap {
                    db_size: 100,
                    db_in_use: 50,
                    leader: i == 1,
                    puts: Some(puts),
                    events: Some(events),
                    cpu: 0,
                })
                .collect(),
            daemons: Metrics::default(),
            daemon_cpu: vec![0, 0],
            load1: 0.0,
        };
        let a = snap(0.0, 0.0, 10, 0);
        let b = snap(100.0, 30.0, 60, 10);
        let w = Window::between("w", 2, 0, &a, &b, 100);
        assert_eq!(w.puts, Some(100.0));
        assert_eq!(w.events, Some(90.0));
        assert_eq!(w.txns, 50.0);
        assert_eq!(w.fanout(), Some(0.9));
        assert!((w.secs - 10.0).abs() < 0.1);
    }
}
