//! VM failover figures of `debvisor-bench` (`--failover`, issue 14, needs root, KVM and
//! `ipmi_sim`): how long after a node fails its VMs run on other nodes, with the shipped
//! keepalive and fencing timers.
//!
//! One 3-node cluster of the multi-node harness is built once and reused: one etcd member,
//! an isolated libvirtd per node running real KVM guests, a fake BMC per node (`ipmi_sim`,
//! whose power off kills every process of the node's namespace), the run recorder following
//! every guest on every node. The daemons run with [`KeepaliveConfig::default`] and the
//! shipped fencing defaults; only `fencing.enabled: true` is set, plus
//! `fencing.max_per_window` raised (see [`YAML`]). Each run picks a victim among the
//! secondaries (rotating), starts two tiny guests there, applies the [`Fault`] (kill -9 of
//! its daemon, or its switch port down) and waits until both guests run elsewhere. Then it
//! puts everything back: the guests undefined, the link healed, the node powered on through
//! its BMC and readmitted. The faults alternate run by run, so the machine's load drifts
//! over both alike.
//!
//! Milestones of a run, in ms after the fault on the bench's monotonic clock (daemon log
//! timestamps are placed on it through a wall-clock reading taken just before the fault):
//!
//! - *detection*: the victim's `alive` key deleted, as the bench's own etcd watch delivers
//!   it (its lease expired on the server);
//! - *grace*: the primary's `node declared dead` line for the victim;
//! - *fence*: its `fence confirmed: the BMC reports power off` line;
//! - *placement*: the last of its `VM recovered: it starts on its new node` lines for the
//!   run's guests;
//! - *start* (the figure): the first poll in which every guest's `vms/<uuid>/status` says
//!   `running` on a node other than the victim.
//!
//! After every run the recorder is synced and checked: any interval in which one guest ran
//! on two nodes at once is a double run, counted per run.

use std::time::{Duration, Instant, SystemTime};

use debvisor_daemon::config::{Config, KeepaliveConfig};
use debvisor_tests::cluster::{require_ipmi_sim, wait_until, Cluster, Node, Power};
use debvisor_tests::libvirt::{kvm_available, random_uuid, tiny_guest_xml, unique_name};
use serde_json::Value;

use super::clock::{epoch_micros, now_utc_string};
use super::cluster::{
    dist, first_line_at, message_is, node, opt_secs, phases, secs, AliveWatch, Applied,
};
use super::host::{load_fmt, load_triple, loadavg, render_load, render_stopped};
use super::logs::str_field;
use super::report::{bench_command, publish, Machine};
use super::stats::verdict;
use crate::{Args, BenchResult};

/// Start marker of the generated section in `docs/benchmarks.md`.
const MARK_START: &str = "<!-- bench:failover:start -->";
/// End marker of the generated section in `docs/benchmarks.md`.
const MARK_END: &str = "<!-- bench:failover:end -->";
/// Nodes of the cluster.
const NODES: usize = 3;
/// Guests started on the victim in every run.
const GUESTS: usize = 2;
/// The daemons' YAML: fencing on, and the fence rate cap raised above the runs of one bench
/// (the shipped 3 per 10 min would refuse the fourth run's fence; it bounds how many
/// fences start, not how fast one goes).
const YAML: &str = "fencing:\n  enabled: true\n  max_per_window: 1000\n";
/// [`YAML`] on one line for the report (`fencing: {enabled: true, …}`).
fn yaml_inline() -> String {
    let mut lines = YAML.lines();
    let head = lines.next().unwrap_or_default();
    let body: Vec<&str> = lines.map(str::trim).collect();
    format!("{head} {{{}}}", body.join(", "))
}

/// How long a run may take until every guest runs elsewhere before it counts as failed.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);
/// How long a guest may take to run, a node to come back, the cluster to settle.
const SETTLE: Duration = Duration::from_secs(180);
/// The target for fault → every guest running elsewhere (p95).
const TARGET: Duration = Duration::from_secs(15);
/// The primary's log line when the grace after a vanished `alive` key ran out.
const DECLARED_DEAD: &str = "node declared dead: its lease expired and it did not stop cleanly";
/// The primary's log line when the BMC confirmed the power off.
const FENCE_CONFIRMED: &str = "fence confirmed: the BMC reports power off";
/// The primary's log line per recovered VM.
const VM_RECOVERED: &str = "VM recovered: it starts on its new node";

/// A fault applied to a secondary node in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL of the node's daemon (its guests keep running until the guardian's
    /// self-fence or the power off).
    Kill,
    /// The node's switch port down (the daemon runs on, cut off; it self-fences its guests).
    Cut,
}

impl Fault {
    /// Both faults, in the order they alternate.
    const ALL: [Fault; 2] = [Fault::Kill, Fault::Cut];

    /// Name in the tables.
    fn label(self) -> &'static str {
        match self {
            Fault::Kill => "`kill -9` of the node's daemon",
            Fault::Cut => "the node's link cut",
        }
    }

    /// Short name for the per-run table and the progress lines.
    fn short(self) -> &'static str {
        match self {
            Fault::Kill => "kill -9",
            Fault::Cut => "link cut",
        }
    }
}

/// The names of the phases between the milestones (see the module documentation).
const PHASES: [&str; 5] = [
    "detection: fault → `alive` key deleted (lease expired)",
    "grace: → primary's `node declared dead`",
    "fence: → `fence confirmed: the BMC reports power off`",
    "placement: → last `VM recovered` line",
    "start: → every guest's status `running` on its new node",
];

/// What one run measured; times are milliseconds after the fault.
#[derive(Debug, Clone)]
struct Run {
    fault: Fault,
    /// The node the fault hit.
    victim: String,
    /// Where the guests ended up (one entry per guest that did).
    placed_on: Vec<String>,
    /// Fault → every guest `running` elsewhere (`None`: not within [`RECOVERY_DEADLINE`]).
    total: Option<f64>,
    /// Detection, grace, fence and placement milestones.
    marks: [Option<f64>; 4],
    /// Double runs the recorder found that it had not found before this run.
    double_runs: Vec<String>,
    /// The 1-minute load average when the run began.
    load: f64,
}

/// The cluster of the figures (see the module documentation).
pub(crate) fn build_cluster(ka: &KeepaliveConfig) -> BenchResult<Cluster> {
    Cluster::builder()
        .nodes(NODES)
        .etcd_members(1)
        .keepalive(ka.interval, ka.lease_ttl)
        .isolated_libvirt(true)
        .with_bmcs()
        .track_runs(true)
        .yaml(YAML)
        .build()
        .map_err(|e| format!("building the cluster: {e}"))
}

/// `vms/<uuid>/status` as (state, node).
pub(crate) fn vm_status(c: &Cluster, uuid: &str) -> Option<(String, String)> {
    let s: Value = serde_json::from_str(&c.etcd_get(&format!("vms/{uuid}/status")).ok()??).ok()?;
    Some((
        s["state"].as_str()?.to_owned(),
        s["node"].as_str()?.to_owned(),
    ))
}

/// Define a tiny KVM guest meant to run on `on`; its UUID.
pub(crate) fn put_guest(c: &Cluster, on: &str) -> BenchResult<String> {
    let (uuid, name) = (random_uuid(), unique_name("failover"));
    let xml = tiny_guest_xml(&name, &uuid);
    let k = |f: &str| format!("vms/{uuid}/{f}");
    c.etcd_put_all(&[(&k("xml"), &xml), (&k("node"), on), (&k("state"), "start")])
        .map_err(|e| format!("writing VM {uuid}: {e}"))?;
    Ok(uuid)
}

/// Start [`GUESTS`] guests on `victim` and wait until each runs there (status and recorder).
fn start_guests(c: &Cluster, victim: &str) -> BenchResult<Vec<String>> {
    let vms = (0..GUESTS)
        .map(|_| put_guest(c, victim))
        .collect::<BenchResult<Vec<_>>>()?;
    for uuid in &vms {
        wait_until(&format!("{uuid} running on {victim}"), SETTLE, || {
            let (state, on) = vm_status(c, uuid)?;
            (state == "running" && on == victim).then_some(())
        })
        .map_err(|e| e.to_string())?;
        c.runs()
            .wait_running_on(uuid, victim, SETTLE)
            .map_err(|e| e.to_string())?;
    }
    Ok(vms)
}

/// Wait until every node runs, holds a lease and is in `run`, and one is primary; the
/// primary's name.
pub(crate) fn ready(c: &Cluster) -> BenchResult<String> {
    wait_until("every node alive in run, one primary", SETTLE, || {
        if !c.nodes().iter().all(Node::is_running) {
            return None;
        }
        if c.alive_nodes().ok()?.len() != c.nodes().len() {
            return None;
        }
        let all_run = c
            .nodes()
            .iter()
            .all(|n| c.daemon_state(n.name()).ok().flatten().as_deref() == Some("run"));
        all_run.then(|| c.primary().ok().flatten()).flatten()
    })
    .map_err(|e| format!("the cluster did not settle: {e}"))
}

/// The `n`-th victim: the secondaries in name order, rotating.
fn pick_victim(c: &Cluster, primary: &str, n: usize) -> BenchResult<String> {
    let secondaries: Vec<&str> = c
        .nodes()
        .iter()
        .map(Node::name)
        .filter(|m| *m != primary)
        .collect();
    if secondaries.is_empty() {
        return Err("no secondary to fail".into());
    }
    Ok(secondaries[n % secondaries.len()].to_owned())
}

/// Apply `fault` to `victim`.
fn apply_fault(victim: &Node, fault: Fault) -> BenchResult<Applied> {
    let (anchor, anchor_wall) = (Instant::now(), epoch_micros(SystemTime::now()));
    let at = match fault {
        Fault::Kill => victim.kill9(),
        Fault::Cut => victim.cut_link(),
    }
    .map_err(|e| format!("{} of {}: {e}", fault.short(), victim.name()))?;
    Ok(Applied::at(anchor, anchor_wall, at))
}

/// The figure: wait until every guest's status says `running` on a node other than
/// `victim`; the instant the last one was first seen so, and where each runs (`None`: not
/// within [`RECOVERY_DEADLINE`]; the nodes found so far are still returned).
fn wait_placed(c: &Cluster, vms: &[String], victim: &str) -> (Option<Instant>, Vec<String>) {
    let mut seen: Vec<Option<(Instant, String)>> = vec![None; vms.len()];
    let done = wait_until("every guest running elsewhere", RECOVERY_DEADLINE, || {
        for (uuid, slot) in vms.iter().zip(seen.iter_mut()) {
            if slot.is_none() {
                *slot = vm_status(c, uuid)
                    .filter(|(state, on)| state == "running" && on != victim)
                    .map(|(_, on)| (Instant::now(), on));
            }
        }
        seen.iter()
            .map(|s| s.as_ref().map(|(t, _)| *t))
            .collect::<Option<Vec<Instant>>>()
            .and_then(|ts| ts.into_iter().max())
    })
    .ok();
    let nodes = seen.into_iter().flatten().map(|(_, on)| on).collect();
    (done, nodes)
}

/// The first line at or after the fault, on any node but the victim, whose message is `m`
/// and whose field `key` is `value`; ms after the fault.
fn line_ms(c: &Cluster, victim: &str, f: Applied, m: &str, key: &str, value: &str) -> Option<f64> {
    c.nodes()
        .iter()
        .filter(|n| n.name() != victim)
        .filter_map(|n| {
            first_line_at(&n.json_lines(), f.wall, |v| {
                message_is(v, m) && str_field(v, key) == Some(value)
            })
        })
        .min()
        .map(|ts| f.ms_to_wall(ts))
}

/// The grace, fence and placement milestones from the daemons' logs (placement: the last
/// guest's `VM recovered` line; `None` unless every guest has one).
fn log_marks(c: &Cluster, victim: &str, vms: &[String], f: Applied) -> [Option<f64>; 3] {
    let dead = line_ms(c, victim, f, DECLARED_DEAD, "node", victim);
    let fenced = line_ms(c, victim, f, FENCE_CONFIRMED, "node", victim);
    let placed = vms
        .iter()
        .map(|uuid| line_ms(c, victim, f, VM_RECOVERED, "uuid", uuid))
        .collect::<Option<Vec<f64>>>()
        .and_then(|xs| xs.into_iter().reduce(f64::max));
    [dead, fenced, placed]
}

/// The recorder's double runs as lines, after syncing it (two list rounds).
pub(crate) fn double_runs(c: &Cluster) -> BenchResult<Vec<String>> {
    c.runs()
        .sync(2, SETTLE)
        .map_err(|e| format!("run recorder sync: {e}"))?;
    Ok(match c.runs().check() {
        Ok(()) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    })
}

/// Undefine the run's guests (`vm undefine --force` from `via`), wait until no node runs
/// them and their keys are gone.
fn remove_guests(c: &Cluster, via: &Node, vms: &[String]) -> BenchResult<()> {
    for uuid in vms {
        // The transaction is refused when the VM's keys change meanwhile: try again.
        wait_until(&format!("vm undefine {uuid}"), SETTLE, || {
            via.ctl_ok(&["vm", "undefine", uuid, "--force"]).ok()
        })
        .map_err(|e| e.to_string())?;
    }
    wait_until("the run's guests gone", SETTLE, || {
        vms.iter()
            .all(|u| {
                c.runs().running_on(u).is_none()
                    && c.etcd_get_prefix(&format!("vms/{u}/"))
                        .is_ok_and(|m| m.is_empty())
            })
            .then_some(())
    })
    .map_err(|e| e.to_string())
}

/// Bring the victim back: heal its link (after a cut), wait for the fence's power off,
/// power it on through its BMC, wait until it runs, readmit it (from `via`).
fn restore_victim(victim: &Node, via: &Node, fault: Fault) -> BenchResult<()> {
    let name = victim.name();
    if fault == Fault::Cut {
        victim
            .heal_link()
            .map_err(|e| format!("healing {name}: {e}"))?;
    }
    let bmc = victim.bmc();
    bmc.wait_power(Power::Off, SETTLE)
        .map_err(|e| format!("{name} powered off by the fence: {e}"))?;
    bmc.power_on()
        .map_err(|e| format!("powering {name} on: {e}"))?;
    victim
        .wait_run(SETTLE)
        .map_err(|e| format!("{name} back in run: {e}"))?;
    via.ctl_ok(&["node", "readmit", name])
        .map_err(|e| format!("readmitting {name}: {e}"))?;
    Ok(())
}

/// One run of `fault` on the `n`-th victim, recovery included.
fn one_run(c: &Cluster, watch: &AliveWatch, fault: Fault, n: usize) -> BenchResult<Run> {
    let primary = ready(c)?;
    let victim = pick_victim(c, &primary, n)?;
    let vms = start_guests(c, &victim)?;
    watch.wait_live()?;
    let before = double_runs(c)?.len();
    let load = loadavg();
    let f = apply_fault(node(c, &victim)?, fault)?;
    let (placed, placed_on) = wait_placed(c, &vms, &victim);
    let detected = watch.gone_after(&victim, f.at).map(|t| f.ms_to(t));
    let [dead, fenced, recovered] = log_marks(c, &victim, &vms, f);
    let via = node(c, &primary)?;
    remove_guests(c, via, &vms)?;
    restore_victim(node(c, &victim)?, via, fault)?;
    Ok(Run {
        fault,
        victim,
        placed_on,
        total: placed.map(|t| f.ms_to(t)),
        marks: [detected, dead, fenced, recovered],
        double_runs: double_runs(c)?.into_iter().skip(before).collect(),
        load,
    })
}

/// The progress line of a finished run, on stderr.
fn progress(i: usize, runs: usize, r: &Run) {
    eprintln!(
        "debvisor-bench: [failover] {}/{runs} {} of {} → {}: {} (double runs {})",
        i + 1,
        r.fault.short(),
        r.victim,
        r.placed_on.join(", "),
        r.total
            .map_or_else(|| "not recovered".to_owned(), |t| format!("{t:.0} ms")),
        r.double_runs.len()
    );
}

/// `--failover-runs` runs of each fault, alternating, until `budget` (if any) is spent; the
/// runs done and, if one could not be carried out, the error that stopped them.
fn all_runs(
    args: &Args,
    c: &Cluster,
    watch: &AliveWatch,
    budget: Option<Instant>,
) -> (Vec<Run>, Option<String>) {
    let total = args.failover_runs * Fault::ALL.len();
    let mut runs = Vec::new();
    for i in 0..total {
        if budget.is_some_and(|b| Instant::now() >= b) {
            let e = format!("the time budget ran out after {i} of {total} runs");
            return (runs, Some(e));
        }
        let fault = Fault::ALL[i % Fault::ALL.len()];
        match one_run(c, watch, fault, i / Fault::ALL.len()) {
            Ok(r) => {
                progress(i, total, &r);
                runs.push(r);
            }
            Err(e) => return (runs, Some(format!("run {}, {}: {e}", i + 1, fault.short()))),
        }
    }
    (runs, None)
}

/// What the report says about the setup besides the runs.
struct Setup {
    /// The keepalive settings the daemons ran with (the shipped defaults).
    ka: KeepaliveConfig,
    /// The primary's grace after a vanished `alive` key, as the daemon computes it.
    grace: Duration,
    /// `/proc/loadavg` (1, 5, 15 min) before and after the runs.
    load: (String, String),
    /// The whole bench, cluster bring-up included.
    took: Duration,
    /// How often the alive watch was reopened.
    reopened: u64,
    /// Why the runs stopped early, if they did.
    stopped: Option<String>,
}

/// The grace the daemons run with: [`Config::fence_grace`] of the shipped defaults with
/// fencing on.
pub(crate) fn shipped_grace() -> Duration {
    let mut cfg = Config::default();
    cfg.fencing.enabled = true;
    cfg.fence_grace()
}

/// Check what the figures need before building anything.
pub(crate) fn preflight() -> BenchResult<()> {
    if !debvisor_tests::is_root() {
        return Err("the failover figures need root (namespaces, libvirtd, BMCs)".into());
    }
    if !kvm_available() {
        return Err("the failover figures need a usable /dev/kvm".into());
    }
    if !require_ipmi_sim() {
        return Err("the failover figures need ipmi_sim and ipmitool (openipmi)".into());
    }
    Ok(())
}

/// Run the figures, print them and (unless `--no-write`) write their section of the docs.
/// Runs done before a failure are still reported; the failure is then the result.
pub(crate) fn run(args: &Args, machine: &Machine) -> BenchResult<()> {
    preflight()?;
    let daemon_bin = debvisor_tests::bin_path("debvisord");
    eprintln!("debvisor-bench: daemon binary {}", daemon_bin.display());
    let ka = KeepaliveConfig::default();
    let (started, load_start, t0) = (now_utc_string(), load_triple(), Instant::now());
    let budget = (args.failover_budget_mins > 0)
        .then(|| t0 + Duration::from_secs(args.failover_budget_mins * 60));
    eprintln!(
        "debvisor-bench: [failover] {NODES} nodes, keepalive {:?} / lease {:?}, grace {:?}, \
         {} runs of each fault; /proc/loadavg {load_start}",
        ka.interval,
        ka.lease_ttl,
        shipped_grace(),
        args.failover_runs
    );
    let c = build_cluster(&ka)?;
    let watch = AliveWatch::start(&c)?;
    let (runs, stopped) = all_runs(args, &c, &watch, budget);
    let setup = Setup {
        ka,
        grace: shipped_grace(),
        load: (load_start, load_triple()),
        took: t0.elapsed(),
        reopened: watch.reopened(),
        stopped: stopped.clone(),
    };
    drop(watch);
    drop(c);
    let report = render(args, machine, &started, &setup, &runs);
    publish(args, MARK_START, MARK_END, &report)?;
    stopped.map_or(Ok(()), |e| {
        Err(format!("the failover figures stopped early: {e}"))
    })
}

/// The whole section: setup, the figure and its phases per fault, every run.
fn render(args: &Args, m: &Machine, started: &str, s: &Setup, runs: &[Run]) -> String {
    let mut o = String::new();
    render_setup(&mut o, args, m, started, s, runs);
    render_method(&mut o, args, s);
    for f in Fault::ALL {
        render_fault(&mut o, f, runs);
    }
    render_notes(&mut o, s);
    render_runs(&mut o, runs);
    o
}

/// The heading and the bullets on the command, machine, cluster and load.
fn render_setup(o: &mut String, args: &Args, m: &Machine, started: &str, s: &Setup, runs: &[Run]) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "### VM failover: node fault → its VMs running elsewhere ({started})\n"
    );
    let _ = writeln!(o, "- command: `{}`", bench_command(args, m));
    let _ = writeln!(o, "- machine: {m}; profile `{}`", m.profile);
    let _ = writeln!(
        o,
        "- cluster: {NODES} nodes (all coordinators), each `debvisord` in its own network \
         namespace with its own libvirtd, 1-member etcd 3.4, a fake BMC per node \
         (`ipmi_sim`, fenced with `ipmitool -I lanplus`; its power off kills the node); \
         {GUESTS} real KVM guests (64 MiB, no disk) per run on the victim; the shipped \
         timers: keepalive interval {:?}, lease TTL {:?}, self-fence margin {:?}, fence \
         grace {:?} (`fencing.grace` unset: margin + 3 s), fence timeout 60 s; YAML: `{}`",
        s.ka.interval,
        s.ka.lease_ttl,
        s.ka.demote_margin(),
        s.grace,
        yaml_inline()
    );
    render_load(o, &s.load, runs.iter().map(|r| r.load), s.took);
}

/// How a run goes and what is measured.
fn render_method(o: &mut String, args: &Args, s: &Setup) {
    use std::fmt::Write as _;
    render_stopped(o, s.stopped.as_deref());
    let _ = writeln!(
        o,
        "{} runs of each fault asked, alternating kill -9 and link cut, each on a secondary \
         (rotating; the primary is never hit, so no takeover is mixed in). A run starts \
         {GUESTS} guests on the victim, applies the fault and waits until every guest's \
         `vms/<uuid>/status` says `running` on another node (polled every 25 ms); then the \
         guests are undefined, the link healed, the victim powered on through its BMC and \
         readmitted (`debvisorctl node readmit`). The fence rate cap is raised \
         (`max_per_window`, shipped 3 per 10 min) so every run's fence may start; it does \
         not change how fast one goes. *Double runs*: intervals in which the run recorder \
         (every node's libvirtd, events and 250 ms lists) saw one guest running on two \
         nodes at once, checked after every run. Target of the issue: p95 ≤ {:?}, no \
         double run. The watch on `alive` keys was reopened {} times.\n",
        args.failover_runs, TARGET, s.reopened
    );
}

/// One fault's table: p50/p95/max of every phase and of the total.
fn render_fault(o: &mut String, f: Fault, runs: &[Run]) {
    use std::fmt::Write as _;
    let mine: Vec<&Run> = runs.iter().filter(|r| r.fault == f).collect();
    let totals: Vec<f64> = mine.iter().filter_map(|r| r.total).collect();
    let doubles: usize = mine.iter().map(|r| r.double_runs.len()).sum();
    let split: Vec<Vec<Option<f64>>> = mine
        .iter()
        .filter_map(|r| r.total.map(|t| phases(&r.marks, t)))
        .collect();
    let [_, p95, _, _] = dist(&totals);
    let target_ms = TARGET.as_secs_f64() * 1000.0;
    let ok = !mine.is_empty() && totals.len() == mine.len() && p95 <= target_ms && doubles == 0;
    let _ = writeln!(
        o,
        "#### {}: {} of {} runs recovered, {doubles} double runs, verdict **{}**\n",
        f.label(),
        totals.len(),
        mine.len(),
        verdict(ok)
    );
    let _ = writeln!(o, "| phase (s) | runs | p50 | p95 | max |");
    let _ = writeln!(o, "|---|---:|---:|---:|---:|");
    for (i, name) in PHASES.iter().enumerate() {
        let xs: Vec<f64> = split.iter().filter_map(|p| p[i]).collect();
        let _ = writeln!(o, "| {name} | {} |{}", xs.len(), dist_cells(&xs));
    }
    let _ = writeln!(
        o,
        "| **total: fault → every guest running elsewhere** | {} |{}\n",
        totals.len(),
        dist_cells(&totals)
    );
}

/// ` p50 | p95 | max |` cells of `xs`, p95 in bold.
fn dist_cells(xs: &[f64]) -> String {
    let [p50, p95, _, max] = dist(xs);
    format!(" {} | **{}** | {} |", secs(p50), secs(p95), secs(max))
}

/// Why the figures are what they are, and the references.
fn render_notes(o: &mut String, s: &Setup) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "Detection is the lease expiring on the server: {:?} after the last renewal, renewals \
         every {:?}, so between TTL − interval and TTL after the fault. The grace ({:?}) \
         gives the dead node's guardian time to have destroyed its guests (self-fence at \
         the margin before its lease deadline) before the primary acts; the grace phase is \
         that plus the primary's own view of the deleted key and its next check. A milestone that \
         the clocks put before the previous one is clamped (phase 0). References with their \
         default timers: PVC about 72 s, Proxmox HA about 2 min, Kubernetes 40 s node \
         monitor grace + 300 s toleration before pods are evicted.\n",
        s.ka.lease_ttl, s.ka.interval, s.grace
    );
}

/// One row of the every-run table.
fn run_row(i: usize, r: &Run) -> String {
    let p = r
        .total
        .map(|t| phases(&r.marks, t))
        .unwrap_or_else(|| vec![None; PHASES.len()]);
    let cells: Vec<String> = p.iter().map(|x| opt_secs(*x)).collect();
    let d = if r.double_runs.is_empty() {
        "0".to_owned()
    } else {
        format!("{}: {}", r.double_runs.len(), r.double_runs.join("; "))
    };
    format!(
        "| {} | {} | {} → {} | {} | {} | {} | {d} |",
        i + 1,
        r.fault.short(),
        r.victim,
        r.placed_on.join(", "),
        opt_secs(r.total),
        cells.join(" | "),
        load_fmt(r.load)
    )
}

/// Every run, folded.
fn render_runs(o: &mut String, runs: &[Run]) {
    use std::fmt::Write as _;
    let _ = writeln!(o, "<details><summary>Every run</summary>\n");
    let _ = writeln!(
        o,
        "| # | fault | victim → guests on | total (s) | detection | grace | fence | \
         placement | start | load | double runs |"
    );
    let _ = writeln!(o, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for (i, r) in runs.iter().enumerate() {
        let _ = writeln!(o, "{}", run_row(i, r));
    }
    let _ = writeln!(o, "\n</details>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_grace_is_margin_plus_three_seconds() {
        let ka = KeepaliveConfig::default();
        assert_eq!(shipped_grace(), ka.demote_margin() + Duration::from_secs(3));
    }

    #[test]
    fn the_yaml_on_one_line() {
        assert_eq!(
            yaml_inline(),
            "fencing: {enabled: true, max_per_window: 1000}"
        );
    }

    #[test]
    fn a_run_row_has_a_cell_per_column() {
        let r = Run {
            fault: Fault::Cut,
            victim: "c2".into(),
            placed_on: vec!["c1".into(), "c3".into()],
            total: Some(12_000.0),
            marks: [Some(5_000.0), Some(9_000.0), Some(10_000.0), Some(10_500.0)],
            double_runs: Vec::new(),
            load: 1.5,
        };
        let row = run_row(0, &r);
        assert_eq!(row.matches('|').count(), 12, "{row}");
        assert!(
            row.contains("| 12.00 | 5.00 | 4.00 | 1.00 | 0.50 | 1.50 |"),
            "{row}"
        );
    }
}
