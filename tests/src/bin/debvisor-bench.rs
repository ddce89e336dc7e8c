//! `debvisor-bench`: the benchmarks of docs/architecture.md §7, run against the real `debvisord`, a
//! private etcd 3.4 on loopback and the libvirt test driver (`test:///default`).
//!
//! This file holds only the command line (`Args`, [`USAGE`], `parse_args`) and the dispatch
//! to the figure sets, one module each under `bench/`:
//!
//! - `bench/foundation.rs`: startup to `run`, idle RSS and CPU, etcd requests per keepalive
//!   tick (docs/architecture.md §7).
//! - `bench/networks.rs` (issue 4, needs root): time for a real daemon in a network
//!   namespace to converge `--networks` managed networks written to etcd (create, then
//!   delete), with the firewall off and on, and the nft apply cost of that many networks'
//!   chains in one batch versus one change per network.
//! - `bench/vms.rs` (issue 3): the Domain object's start latency (etcd write → libvirt
//!   start) and convergence of `--vms` VMs on the test driver, etcd requests per keepalive
//!   tick with those VMs running against none, and write → `running` of `--guests` real
//!   guests on `qemu:///system` (root).
//! - `bench/ceph.rs` (`--ceph`) and `bench/ceph_objects.rs` (`--ceph-objects`): Ceph state
//!   collection, and snapshot request → snapshot in Ceph.
//! - `bench/cluster.rs` (`--cluster`, issue 13, needs root): on a 3-node cluster of the
//!   multi-node harness with the shipped keepalive settings, fault on the primary (kill -9,
//!   link cut, SIGTERM) → a new primary alone holding the floating address, and where the
//!   time goes.
//! - `bench/failover.rs` (`--failover`, issue 14, needs root, KVM and `ipmi_sim`): on a
//!   3-node cluster with real guests and fake BMCs, with the shipped keepalive and fencing
//!   timers, a node's daemon killed or its link cut → all its VMs running elsewhere, and
//!   where the time goes (detection, grace, fence, placement, start); double runs counted.
//! - `bench/metrics_scrape.rs` (`--metrics-scrape`, issue 15): what a `GET /metrics` costs
//!   a daemon owning 100 and 1000 running VMs (test driver): bytes, series, CPU and wall
//!   time per scrape.
//! - `bench/scale_idle.rs` (`--scale`, issue 17): what 0, 100 and 1000 idle VMs cost a
//!   node in steady state at the shipped 5 s tick: key versions written to etcd per hour,
//!   events its `vms/` watch receives, daemon CPU per keepalive tick (`--scale-baseline
//!   PATH` measures another `debvisord` first, side by side); `--scale-kvm N` measures the
//!   same with 0 and N real KVM guests on `qemu:///system` (root).
//!
//! - `bench/scale.rs` (`--scale-sim`, issue 17): `--scale-nodes` real daemons (test driver,
//!   `--scale-vms` VMs each) on one 3-member etcd: etcd writes, DB growth, watch fan-out,
//!   keepalive transactions, reactor lag over an idle window and a burst of VM state
//!   changes, daemon and etcd CPU and RSS, and an extrapolation to 500 nodes × 100 VMs.
//!
//! and the helpers they share: `bench/report.rs` (machine facts, the reproducing command,
//! publishing), `bench/stats.rs` (summaries, percentiles, units), `bench/host.rs` (`/proc`
//! readers), `bench/clock.rs` (dates and RFC 3339 timestamps), `bench/logs.rs` (fields of
//! the daemon's JSON log lines) and `bench/ticks.rs` (etcd's `/metrics` across a window of
//! keepalive ticks).
//!
//! Run with `cargo run --release -p debvisor-tests --bin debvisor-bench` (the daemon is built
//! in the profile of this executable); `--networks-only` / `--skip-networks` and
//! `--vms-only` / `--skip-vms` select parts.
//! Tables go to stdout and, unless `--no-write`, into `docs/benchmarks.md` between
//! `<!-- bench:foundation:start -->` and `<!-- bench:foundation:end -->` (and the
//! `bench:networks`, `bench:vms`, `bench:ceph`, `bench:ceph-objects`, `bench:cluster`,
//! `bench:failover`, `bench:metrics-scrape`, `bench:scale-idle` and `bench:scale-kvm`
//! markers). The daemons' own log lines are echoed on stderr by the harness.

use std::process::ExitCode;

use bench::report::Machine;
use bench::{
    ceph, ceph_objects, cluster, failover, foundation, metrics_scrape, networks, scale, scale_idle,
    soak, vm_start, vms,
};

/// The figure sets and the helpers they share, one file each in `bench/` (declared inline:
/// a `bench.rs` beside this file would be built as a binary of its own).
mod bench {
    pub(crate) mod ceph;
    pub(crate) mod ceph_objects;
    pub(crate) mod clock;
    pub(crate) mod cluster;
    pub(crate) mod failover;
    pub(crate) mod foundation;
    pub(crate) mod host;
    pub(crate) mod logs;
    pub(crate) mod metrics_scrape;
    pub(crate) mod networks;
    pub(crate) mod report;
    pub(crate) mod scale;
    pub(crate) mod scale_idle;
    pub(crate) mod soak;
    pub(crate) mod stats;
    pub(crate) mod ticks;
    pub(crate) mod vm_start;
    pub(crate) mod vms;
}

/// Result type of the bench: errors are human-readable strings with their context.
type BenchResult<T> = Result<T, String>;

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
    /// Run only the primary-takeover figures (`bench/cluster.rs`).
    cluster: bool,
    /// Runs of each fault in the primary-takeover figures.
    cluster_runs: usize,
    /// Run only the VM failover figures (`bench/failover.rs`).
    failover: bool,
    /// Runs of each fault in the VM failover figures.
    failover_runs: usize,
    /// Stop starting failover runs after this many minutes (0: no limit).
    failover_budget_mins: u64,
    /// Run only the `/metrics` scrape-cost figures (`bench/metrics_scrape.rs`).
    metrics_scrape: bool,
    /// Run only the soak (`bench/soak.rs`).
    soak: bool,
    /// Run only the VM-start overhead figure (`bench/vm_start.rs`; cycles: `--runs`).
    vm_start: bool,
    /// Fault schedules of the soak.
    soak_runs: usize,
    /// Seed of the soak's draws (`None`: from the clock; the report names it).
    soak_seed: Option<u64>,
    /// Stop starting soak schedules after this many minutes (0: no limit).
    soak_budget_mins: u64,
    /// Run only the cluster-scale simulation (`bench/scale.rs`).
    scale_sim: bool,
    /// Size of the cluster-scale simulation.
    scale: scale::ScaleArgs,
    /// Run only the idle-cost-at-scale figures (`bench/scale_idle.rs`).
    scale_idle: bool,
    /// Another `debvisord` measured first by `--scale` (the "before" of a change).
    scale_baseline: Option<std::path::PathBuf>,
    /// Keepalive intervals `--scale` measures at, in seconds (empty: the shipped 5 s).
    scale_ticks: Vec<u64>,
    /// `--scale` also measures this build with the stats sampler and the full VM resync
    /// at 10 minutes: what the keepalive tick path alone costs.
    scale_keepalive_only: bool,
    /// `--scale` on `qemu:///system` with 0 and then this many real KVM guests instead of
    /// the test driver's 0, 100 and 1000 VMs (issue 17: keepalive CPU with real guests).
    scale_kvm: Option<usize>,
    /// The arguments as given, for the report.
    raw: Vec<String>,
}

/// The usage text of `--help` and of every command-line error.
const USAGE: &str = "usage: debvisor-bench [--runs N] [--idle-secs S] [--ticks N] [--networks N]
                      [--networks-only | --skip-networks] [--vms N] [--vm-rate R] [--guests N]
                      [--vms-only | --skip-vms] [--ceph | --ceph-objects |
                      --cluster [--cluster-runs N] |
                      --failover [--failover-runs N] [--failover-budget-mins M] |
                      --soak [--soak-runs N] [--soak-seed S] [--soak-budget-mins M] |
                      --metrics-scrape | --vm-start [--runs N] |
                      --scale [--scale-baseline PATH] [--scale-tick S]...
                      [--scale-keepalive-only] [--scale-kvm N] |
                      --scale-sim [--scale-nodes N] [--scale-vms N] [--scale-idle-mins M]
                      [--scale-burst N]]
                      [--no-write]

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
  --cluster         run only the primary-takeover figures (3-node cluster, shipped
                    keepalive defaults; kill -9, link cut, SIGTERM; needs root)
  --cluster-runs N  runs of each fault of --cluster (default 20; each kill/cut run
                    takes about a lease TTL plus a restart)
  --failover        run only the VM failover figures (3 nodes with real KVM guests and
                    fake BMCs, shipped timers; kill -9 and link cut of a secondary →
                    its VMs running elsewhere; needs root, /dev/kvm, ipmi_sim)
  --failover-runs N runs of each fault of --failover (default 20; about a minute each)
  --failover-budget-mins M
                    start no failover run after M minutes (default 0: no limit); the
                    report says how many runs were done
  --metrics-scrape  run only the /metrics scrape-cost figures (one daemon owning 100,
                    then 1000 running VMs on the test driver; 200 scrapes each: bytes,
                    series, CPU and wall time per scrape)
  --soak            run only the soak: randomized fault schedules (kill -9, link cut,
                    etcd-only cut, long and short SIGSTOP, flaps, primary lost
                    mid-recovery) on the --failover cluster with 4 real guests, counting
                    double runs (needs root, /dev/kvm, ipmi_sim)
  --soak-runs N     schedules of --soak (default 100; 20-60 s each)
  --soak-seed S     seed of the soak's draws (default: from the clock)
  --soak-budget-mins M
                    start no soak schedule after M minutes (default 0: no limit)
  --vm-start        run only the VM-start overhead figure: a defined KVM guest started
                    through etcd by the daemon vs raw virDomainCreate, --runs interleaved
                    cycles (use --runs 20; needs root, /dev/kvm)
  --scale-sim       run only the cluster-scale simulation: --scale-nodes real daemons
                    (test driver, clustered, shipped keepalive) on one 3-member etcd;
                    etcd writes/s, DB growth, watch fan-out, keepalive transaction
                    latency, reactor lag, CPU and RSS over a baseline without VMs, an
                    idle window and a burst of VM state changes; extrapolated to 500
                    nodes x 100 VMs (memory: about 20-30 MiB per daemon)
  --scale-nodes N   daemons of --scale-sim (default 50)
  --scale-vms N     VMs per daemon of --scale-sim (default 20)
  --scale-idle-mins M
                    idle window of --scale-sim in minutes (default 5)
  --scale-burst N   VM state changes of the --scale-sim burst (default 1000; 0: none)
  --scale           run only the idle-cost figures of issue 17: key versions written
                    to etcd per hour, vms/ watch events and daemon CPU per keepalive
                    tick with 0, 100 and 1000 idle VMs (test driver, 5 s tick, a
                    window of --ticks ticks)
  --scale-baseline PATH
                    with --scale: measure this debvisord first, side by side
  --scale-tick S    with --scale: keepalive interval in seconds (repeatable: one table
                    per interval; default 5); the idle window is --ticks x 5 s at any
  --scale-keepalive-only
                    with --scale: also this build with the stats sampler and the full VM
                    resync at 10 minutes (the keepalive tick path alone)
  --scale-kvm N     with --scale: the same figures with one daemon on qemu:///system
                    and 0, then N (1-64) real running KVM guests (64 MiB, 1 vCPU, no
                    disk) instead of the test driver's VMs (needs root, /dev/kvm)
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
        cluster: false,
        cluster_runs: 20,
        failover: false,
        failover_runs: 20,
        failover_budget_mins: 0,
        metrics_scrape: false,
        soak: false,
        vm_start: false,
        soak_runs: 100,
        soak_seed: None,
        soak_budget_mins: 0,
        scale_sim: false,
        scale: scale::ScaleArgs {
            nodes: 50,
            vms_per_node: 20,
            idle_mins: 5,
            burst: 1000,
        },
        scale_idle: false,
        scale_baseline: None,
        scale_ticks: Vec::new(),
        scale_keepalive_only: false,
        scale_kvm: None,
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
            "--cluster" => args.cluster = true,
            "--cluster-runs" => {
                args.cluster_runs =
                    usize::try_from(value("--cluster-runs")?).map_err(|e| e.to_string())?
            }
            "--failover" => args.failover = true,
            "--failover-runs" => {
                args.failover_runs =
                    usize::try_from(value("--failover-runs")?).map_err(|e| e.to_string())?
            }
            "--failover-budget-mins" => {
                args.failover_budget_mins = value("--failover-budget-mins")?
            }
            "--metrics-scrape" => args.metrics_scrape = true,
            "--soak" => args.soak = true,
            "--vm-start" => args.vm_start = true,
            "--soak-runs" => {
                args.soak_runs =
                    usize::try_from(value("--soak-runs")?).map_err(|e| e.to_string())?
            }
            "--soak-seed" => args.soak_seed = Some(value("--soak-seed")?),
            "--soak-budget-mins" => args.soak_budget_mins = value("--soak-budget-mins")?,
            "--scale-sim" => args.scale_sim = true,
            "--scale-nodes" => {
                args.scale.nodes =
                    usize::try_from(value("--scale-nodes")?).map_err(|e| e.to_string())?
            }
            "--scale-vms" => {
                args.scale.vms_per_node =
                    usize::try_from(value("--scale-vms")?).map_err(|e| e.to_string())?
            }
            "--scale-idle-mins" => args.scale.idle_mins = value("--scale-idle-mins")?,
            "--scale-burst" => {
                args.scale.burst =
                    usize::try_from(value("--scale-burst")?).map_err(|e| e.to_string())?
            }
            "--scale" => args.scale_idle = true,
            "--scale-baseline" => {
                let v = match inline.clone() {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| format!("--scale-baseline needs a value\n{USAGE}"))?,
                };
                args.scale_baseline = Some(v.into());
            }
            "--scale-tick" => {
                let t = value("--scale-tick")?;
                if t == 0 || t > 60 {
                    return Err(format!("--scale-tick {t}: must be 1..60 seconds\n{USAGE}"));
                }
                args.scale_ticks.push(t);
            }
            "--scale-keepalive-only" => args.scale_keepalive_only = true,
            "--scale-kvm" => {
                let n = value("--scale-kvm")?;
                if !(1..=scale_idle::MAX_KVM_GUESTS as u64).contains(&n) {
                    return Err(format!(
                        "--scale-kvm {n}: must be 1..={} guests\n{USAGE}",
                        scale_idle::MAX_KVM_GUESTS
                    ));
                }
                args.scale_kvm = Some(n as usize);
            }
            "--no-write" => args.write = false,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if args.runs == 0
        || args.idle_secs == 0
        || args.ticks == 0
        || args.cluster_runs == 0
        || args.failover_runs == 0
        || args.soak_runs == 0
    {
        return Err(format!(
            "--runs, --idle-secs, --ticks, --cluster-runs, --failover-runs and --soak-runs \
             must be at least 1\n{USAGE}"
        ));
    }
    if !(1..=500).contains(&args.scale.nodes)
        || !(1..=1000).contains(&args.scale.vms_per_node)
        || args.scale.idle_mins == 0
    {
        return Err(format!(
            "--scale-nodes must be between 1 and 500, --scale-vms between 1 and 1000, \
             --scale-idle-mins at least 1\n{USAGE}"
        ));
    }
    if args.scale_kvm.is_some() && !args.scale_idle {
        return Err(format!("--scale-kvm goes with --scale\n{USAGE}"));
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
    if !(1..=vms::MAX_VMS).contains(&args.vms)
        || args.guests == 0
        || !(1..=1000).contains(&args.vm_rate)
    {
        return Err(format!(
            "--vms must be between 1 and {}, --vm-rate between 1 and 1000, --guests at \
             least 1\n{USAGE}",
            vms::MAX_VMS
        ));
    }
    if !(1..=networks::MAX_NETWORKS).contains(&args.networks) {
        return Err(format!(
            "--networks must be between 1 and {}\n{USAGE}",
            networks::MAX_NETWORKS
        ));
    }
    Ok(Some(args))
}

/// Parse the arguments and run: exit 0 on success or `--help`, 2 on a usage error, 1 when
/// a figure set fails.
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
        return ceph::run(args, &Machine::probe());
    }
    if args.ceph_objects {
        return ceph_objects::run(args, &Machine::probe());
    }
    if args.cluster {
        return cluster::run(args, &Machine::probe());
    }
    if args.failover {
        return failover::run(args, &Machine::probe());
    }
    if args.metrics_scrape {
        return metrics_scrape::run(args, &Machine::probe());
    }
    if args.soak {
        return soak::run(args, &Machine::probe());
    }
    if args.vm_start {
        return vm_start::run(args, &Machine::probe());
    }
    if args.scale_sim {
        return scale::run(args, &Machine::probe());
    }
    if args.scale_idle {
        return scale_idle::run(args, &Machine::probe());
    }
    let with_networks = !args.skip_networks && !args.vms_only;
    if with_networks && !debvisor_tests::is_root() {
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
        foundation::run(args, &machine)?;
    }
    if with_networks {
        networks::run(args, &machine)?;
    }
    if !args.skip_vms && !args.networks_only {
        vms::run(args, &machine)?;
    }
    Ok(())
}
