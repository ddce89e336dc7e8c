//! `--soak`: randomized fault schedules against the failover cluster, looking for a VM that
//! runs twice (issue 14's soak; not part of CI).
//!
//! The cluster is the `--failover` one: 3 nodes, each `debvisord` in its own namespace with
//! its own libvirtd and a fake BMC (`ipmi_sim`: its power off kills the node), fencing on,
//! the shipped timers, and the run recorder following every guest from every libvirtd's
//! lifecycle events (it fails on any overlap of one UUID on two nodes, not just at samples).
//! A pool of [`POOL`] real KVM guests stays up for the whole soak.
//!
//! Each schedule draws (from `--soak-seed`) a fault and a node hosting guests:
//!
//! - `kill -9` of the daemon, a link cut, an etcd-only cut, a SIGSTOP longer than the lease:
//!   the node must be fenced and its guests recovered elsewhere;
//! - a SIGSTOP shorter than half the lease, a flapping link: nothing may be fenced or moved;
//! - primary loss mid-recovery: a secondary is killed, and once the primary has declared it
//!   dead the primary is stopped (SIGTERM) or killed (and restarted a few seconds later).
//!
//! Then the bench heals what it cut, powers on and readmits every fenced node, waits until
//! every node is back in `run` and every guest runs exactly once (status and recorder
//! agree), and counts the recorder's double runs. A schedule that does not settle stops the
//! soak (the report says where).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use debvisor_daemon::config::KeepaliveConfig;
use debvisor_tests::cluster::{wait_until, Cluster, Node, Power};

use super::clock::now_utc_string;
use super::cluster::node;
use super::failover::{
    build_cluster, double_runs, preflight, put_guest, ready, shipped_grace, vm_status,
};
use super::host::{load_triple, loadavg, render_load, render_stopped};
use super::logs::str_field;
use super::report::{bench_command, publish, Machine};
use crate::{Args, BenchResult};

const MARK_START: &str = "<!-- bench:soak:start -->";
const MARK_END: &str = "<!-- bench:soak:end -->";

/// Guests kept running through the soak.
const POOL: usize = 4;
/// Longest wait for the cluster or the pool to settle.
const SETTLE: Duration = Duration::from_secs(180);
/// Longest wait for a fault that must fence to power its node off.
const FENCE_WAIT: Duration = Duration::from_secs(120);
/// The primary's line when it declares a node dead.
const DECLARED_DEAD: &str = "node declared dead: its lease expired and it did not stop cleanly";

/// One kind of fault of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill,
    Cut,
    EtcdCut,
    LongStop,
    ShortStop,
    Flap,
    PrimaryLoss,
}

impl Fault {
    /// Every fault, drawn with equal weight.
    const ALL: [Fault; 7] = [
        Fault::Kill,
        Fault::Cut,
        Fault::EtcdCut,
        Fault::LongStop,
        Fault::ShortStop,
        Fault::Flap,
        Fault::PrimaryLoss,
    ];

    /// Name in the tables.
    fn label(self) -> &'static str {
        match self {
            Fault::Kill => "kill -9 of the daemon",
            Fault::Cut => "link cut",
            Fault::EtcdCut => "etcd-only cut",
            Fault::LongStop => "SIGSTOP past the lease",
            Fault::ShortStop => "SIGSTOP < lease/2, then SIGCONT",
            Fault::Flap => "flapping link",
            Fault::PrimaryLoss => "primary lost mid-recovery",
        }
    }

    /// Must the hit node be fenced?
    fn fences(self) -> bool {
        !matches!(self, Fault::ShortStop | Fault::Flap)
    }
}

/// A small deterministic generator (xorshift64*), so a seed replays a soak's choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` ≥ 1).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A duration between `lo` and `hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }

    fn pick<T: Clone>(&mut self, xs: &[T]) -> Option<T> {
        (!xs.is_empty()).then(|| xs[self.below(xs.len() as u64) as usize].clone())
    }
}

/// What one schedule did and found.
#[derive(Debug, Clone)]
struct Outcome {
    fault: Fault,
    victim: String,
    /// Parameters drawn (stop length, flap period, what happened to the primary).
    detail: String,
    /// Nodes found powered off by a fence (and powered on, readmitted).
    fenced: Vec<String>,
    /// Guests whose node changed.
    moved: usize,
    /// Double runs the recorder found that it had not found before.
    double_runs: Vec<String>,
    /// Fault → everything settled again.
    took: Duration,
    /// What did not go as the fault predicts (a fence that should not be, none that should).
    note: Option<String>,
    /// The 1-minute load average when the schedule began.
    load: f64,
}

/// Start the pool, spread over the nodes, and wait until each guest runs.
fn start_pool(c: &Cluster) -> BenchResult<Vec<String>> {
    let names: Vec<String> = c.nodes().iter().map(|n| n.name().to_owned()).collect();
    let vms = (0..POOL)
        .map(|i| put_guest(c, &names[i % names.len()]))
        .collect::<BenchResult<Vec<_>>>()?;
    placement(c, &vms)?;
    Ok(vms)
}

/// Wait until every guest runs exactly once: its status says `running` on a node whose
/// daemon runs, and the recorder sees it there; where each runs.
fn placement(c: &Cluster, vms: &[String]) -> BenchResult<BTreeMap<String, String>> {
    wait_until("every guest running once", SETTLE, || {
        vms.iter()
            .map(|uuid| {
                let (state, on) = vm_status(c, uuid)?;
                let up = c.node_named(&on).is_some_and(Node::is_running);
                (state == "running" && up && c.runs().running_on(uuid).as_deref() == Some(&on))
                    .then(|| (uuid.clone(), on))
            })
            .collect::<Option<BTreeMap<_, _>>>()
    })
    .map_err(|e| e.to_string())
}

/// The state of `nodes/<n>/fence` (`None`: no record).
fn fence_state(c: &Cluster, n: &str) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_str(&c.etcd_get(&format!("nodes/{n}/fence")).ok()??).ok()?;
    v["state"].as_str().map(str::to_owned)
}

/// Wait until the primary is done with `victim`: its fence record says `recovered` (fenced,
/// and every VM that may move moved) or `failed`; that state (`None`: neither in time).
fn fence_done(c: &Cluster, victim: &str) -> Option<String> {
    wait_until("the fence and recovery done", FENCE_WAIT, || {
        fence_state(c, victim).filter(|s| s == "recovered" || s == "failed")
    })
    .ok()
}

/// Lines on `n` declaring `victim` dead so far.
fn dead_lines(n: &Node, victim: &str) -> usize {
    n.json_lines()
        .iter()
        .filter(|v| v["message"] == DECLARED_DEAD && str_field(v, "node") == Some(victim))
        .count()
}

/// Kill `victim`, and once `primary` declared it dead, stop or kill the primary; the detail.
fn primary_loss(c: &Cluster, rng: &mut Rng, victim: &Node, primary: &str) -> BenchResult<String> {
    let p = node(c, primary)?;
    let before = dead_lines(p, victim.name());
    victim
        .kill9()
        .map_err(|e| format!("kill -9 {}: {e}", victim.name()))?;
    wait_until("the primary declaring the victim dead", FENCE_WAIT, || {
        (dead_lines(p, victim.name()) > before).then_some(())
    })
    .map_err(|e| e.to_string())?;
    // The fence and the recovery are under way: lose the primary now.
    let pause = rng.millis(0, 1500);
    std::thread::sleep(pause);
    if rng.below(2) == 0 {
        p.sigterm().map_err(|e| format!("SIGTERM {primary}: {e}"))?;
        p.wait_exit(Duration::from_secs(60))
            .map_err(|e| format!("{primary} exiting: {e}"))?;
        p.start().map_err(|e| format!("starting {primary}: {e}"))?;
        Ok(format!(
            "primary {primary} stopped (SIGTERM) {} ms after declaring the victim dead, started again",
            pause.as_millis()
        ))
    } else {
        p.kill9().map_err(|e| format!("kill -9 {primary}: {e}"))?;
        let down = rng.millis(1000, 5000);
        std::thread::sleep(down);
        p.start().map_err(|e| format!("starting {primary}: {e}"))?;
        Ok(format!(
            "primary {primary} killed {} ms after declaring the victim dead, restarted {} ms later",
            pause.as_millis(),
            down.as_millis()
        ))
    }
}

/// Apply `fault` to `victim`; the parameters drawn.
fn apply(
    c: &Cluster,
    rng: &mut Rng,
    ka: &KeepaliveConfig,
    fault: Fault,
    victim: &Node,
    primary: &str,
) -> BenchResult<String> {
    let name = victim.name();
    let err = |what: &str, e: &dyn std::fmt::Display| format!("{what} {name}: {e}");
    match fault {
        Fault::Kill => victim
            .kill9()
            .map(|_| String::new())
            .map_err(|e| err("kill -9", &e)),
        Fault::Cut => victim
            .cut_link()
            .map(|_| String::new())
            .map_err(|e| err("cut", &e)),
        Fault::EtcdCut => victim
            .cut_etcd()
            .map(|_| String::new())
            .map_err(|e| err("cut etcd of", &e)),
        Fault::LongStop => victim
            .stop()
            .map(|_| String::new())
            .map_err(|e| err("stop", &e)),
        Fault::ShortStop => {
            let half = u64::try_from(ka.lease_ttl.as_millis() / 2).unwrap_or(3000);
            let d = rng.millis(300, half);
            victim.stop().map_err(|e| err("stop", &e))?;
            std::thread::sleep(d);
            victim.cont().map_err(|e| err("cont", &e))?;
            Ok(format!("stopped {} ms", d.as_millis()))
        }
        Fault::Flap => {
            let period = rng.millis(200, 600);
            let times = 2 + rng.below(3) as u32;
            let f = victim
                .flap_link(period, times)
                .map_err(|e| err("flap", &e))?;
            f.wait().map_err(|e| err("flap", &e))?;
            Ok(format!("{times} × {} ms", period.as_millis()))
        }
        Fault::PrimaryLoss => primary_loss(c, rng, victim, primary),
    }
}

/// Heal what `fault` cut, power on and readmit every node a fence powered off, start every
/// daemon that is not running; the fenced nodes.
fn restore(c: &Cluster, fault: Fault, victim: &Node) -> BenchResult<Vec<String>> {
    let name = victim.name();
    if fault == Fault::Cut {
        victim
            .heal_link()
            .map_err(|e| format!("heal {name}: {e}"))?;
    }
    if victim.is_etcd_cut() {
        victim
            .heal_etcd()
            .map_err(|e| format!("heal etcd of {name}: {e}"))?;
    }
    let mut fenced = Vec::new();
    for n in c.nodes() {
        let off = n
            .bmc()
            .power()
            .map_err(|e| format!("BMC of {}: {e}", n.name()))?
            == Power::Off;
        if off {
            n.bmc()
                .power_on()
                .map_err(|e| format!("power on {}: {e}", n.name()))?;
            fenced.push(n.name().to_owned());
        } else if n.is_stopped() {
            n.cont().map_err(|e| format!("cont {}: {e}", n.name()))?;
        } else if !n.is_running() {
            n.start().map_err(|e| format!("start {}: {e}", n.name()))?;
        }
    }
    for n in c.nodes() {
        n.wait_run(SETTLE)
            .map_err(|e| format!("{} back in run: {e}", n.name()))?;
    }
    let fenced_state: Vec<String> = c
        .nodes()
        .iter()
        .map(|n| n.name().to_owned())
        .filter(|n| c.daemon_state(n).ok().flatten().as_deref() == Some("fenced"))
        .collect();
    for f in &fenced_state {
        let via = c
            .nodes()
            .iter()
            .find(|n| n.name() != f)
            .ok_or("no node to readmit from")?;
        wait_until(&format!("node readmit {f}"), SETTLE, || {
            via.ctl_ok(&["node", "readmit", f]).ok()
        })
        .map_err(|e| e.to_string())?;
    }
    Ok(fenced)
}

/// One schedule: draw, apply, settle, restore, check.
fn one(c: &Cluster, rng: &mut Rng, ka: &KeepaliveConfig, pool: &[String]) -> BenchResult<Outcome> {
    let primary = ready(c)?;
    let before = placement(c, pool)?;
    let known = double_runs(c)?.len();
    let mut hosting: Vec<String> = before.values().cloned().collect();
    hosting.sort();
    hosting.dedup();
    let mut fault = rng.pick(&Fault::ALL).unwrap_or(Fault::Kill);
    let secondaries: Vec<String> = hosting.iter().filter(|n| **n != primary).cloned().collect();
    let victim = if fault == Fault::PrimaryLoss {
        match rng.pick(&secondaries) {
            Some(v) => v,
            None => {
                fault = Fault::Kill;
                rng.pick(&hosting).ok_or("no node hosts a guest")?
            }
        }
    } else {
        rng.pick(&hosting).ok_or("no node hosts a guest")?
    };
    let v = node(c, &victim)?;
    eprintln!("debvisor-bench: [soak] {} of {victim} (primary {primary})", fault.label());
    let load = loadavg();
    let t0 = Instant::now();
    let detail = apply(c, rng, ka, fault, v, &primary)?;
    let mut note = None;
    if fault.fences() {
        // Nothing is powered on before the primary is done: a power cycle under its fence
        // would fail the fence (it polls for Off).
        match fence_done(c, &victim).as_deref() {
            Some("recovered") => {}
            Some(s) => note = Some(format!("{victim}: fence {s}")),
            None => {
                note = Some(format!(
                    "{victim} not fenced and recovered within {FENCE_WAIT:?}"
                ))
            }
        }
    } else {
        // Long enough for a lost lease to be declared dead and fenced: nothing may happen.
        std::thread::sleep(ka.lease_ttl + shipped_grace() + Duration::from_secs(2));
        if let Some(s) = fence_state(c, &victim) {
            note = Some(format!(
                "{victim} has a fence record ({s}) after a fault shorter than its lease"
            ));
        }
    }
    let fenced = restore(c, fault, v)?;
    ready(c)?;
    let after = placement(c, pool)?;
    let moved = before
        .iter()
        .filter(|(uuid, on)| after.get(*uuid) != Some(*on))
        .count();
    if !fault.fences() && moved > 0 && note.is_none() {
        note = Some(format!("{moved} guest(s) moved without a fence"));
    }
    Ok(Outcome {
        fault,
        victim,
        detail,
        fenced,
        moved,
        double_runs: double_runs(c)?.into_iter().skip(known).collect(),
        took: t0.elapsed(),
        note,
        load,
    })
}

/// Run the soak, print the report and (unless `--no-write`) write its section of the docs.
pub(crate) fn run(args: &Args, machine: &Machine) -> BenchResult<()> {
    preflight()?;
    let ka = KeepaliveConfig::default();
    let seed = args.soak_seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let (started, load_start, t0) = (now_utc_string(), load_triple(), Instant::now());
    let budget =
        (args.soak_budget_mins > 0).then(|| t0 + Duration::from_secs(args.soak_budget_mins * 60));
    eprintln!(
        "debvisor-bench: [soak] seed {seed}, {} schedules, {POOL} guests, keepalive {:?} / lease {:?}",
        args.soak_runs, ka.interval, ka.lease_ttl
    );
    let c = build_cluster(&ka)?;
    let mut rng = Rng::new(seed);
    let mut outcomes = Vec::new();
    let stopped = match start_pool(&c) {
        Err(e) => Some(format!("starting the pool: {e}")),
        Ok(pool) => {
            let mut stopped = None;
            for i in 0..args.soak_runs {
                if budget.is_some_and(|b| Instant::now() >= b) {
                    stopped = Some(format!(
                        "the time budget ran out after {i} of {} schedules",
                        args.soak_runs
                    ));
                    break;
                }
                match one(&c, &mut rng, &ka, &pool) {
                    Ok(o) => {
                        eprintln!(
                            "debvisor-bench: [soak] {}/{} {} of {} {}: fenced [{}], moved {}, double runs {}, {:.1} s{}",
                            i + 1,
                            args.soak_runs,
                            o.fault.label(),
                            o.victim,
                            o.detail,
                            o.fenced.join(", "),
                            o.moved,
                            o.double_runs.len(),
                            o.took.as_secs_f64(),
                            o.note.as_deref().map(|n| format!(" — {n}")).unwrap_or_default()
                        );
                        outcomes.push(o);
                    }
                    Err(e) => {
                        stopped = Some(format!("schedule {}: {e}", i + 1));
                        break;
                    }
                }
            }
            stopped
        }
    };
    let all_double = c.runs().check().err().map(|e| e.0.len()).unwrap_or(0);
    let took = t0.elapsed();
    drop(c);
    let report = render(
        args,
        machine,
        &started,
        seed,
        &(load_start, load_triple()),
        took,
        stopped.as_deref(),
        &outcomes,
        all_double,
    );
    publish(args, MARK_START, MARK_END, &report)?;
    stopped.map_or(Ok(()), |e| Err(format!("the soak stopped early: {e}")))
}

/// The section: setup, a table per fault, every schedule.
#[allow(clippy::too_many_arguments)]
fn render(
    args: &Args,
    m: &Machine,
    started: &str,
    seed: u64,
    load: &(String, String),
    took: Duration,
    stopped: Option<&str>,
    outs: &[Outcome],
    all_double: usize,
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Soak: randomized fault schedules, looking for a VM running twice ({started})\n"
    );
    let _ = writeln!(o, "- command: `{}`", bench_command(args, m));
    let _ = writeln!(o, "- machine: {m}; profile `{}`", m.profile);
    let _ = writeln!(
        o,
        "- cluster: the `--failover` one (3 nodes, own libvirtd and `ipmi_sim` BMC each, \
         fencing on, shipped timers), {POOL} real KVM guests kept up through the soak, the \
         run recorder on every libvirtd's lifecycle events; seed `{seed}` (`--soak-seed` \
         replays the choices)"
    );
    render_load(&mut o, load, outs.iter().map(|x| x.load), took);
    render_stopped(&mut o, stopped);
    let total_double: usize = outs.iter().map(|x| x.double_runs.len()).sum();
    let _ = writeln!(
        o,
        "**{} schedules, {} fences, {} guests moved, double runs: {} in the schedules, {} \
         over the whole soak (target 0); {} schedule(s) with a note.**\n",
        outs.len(),
        outs.iter().map(|x| x.fenced.len()).sum::<usize>(),
        outs.iter().map(|x| x.moved).sum::<usize>(),
        total_double,
        all_double,
        outs.iter().filter(|x| x.note.is_some()).count()
    );
    let _ = writeln!(
        o,
        "| fault | schedules | nodes fenced | guests moved | double runs | notes | fault → settled, p50 / max (s) |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|");
    for f in Fault::ALL {
        let xs: Vec<&Outcome> = outs.iter().filter(|x| x.fault == f).collect();
        let mut t: Vec<f64> = xs.iter().map(|x| x.took.as_secs_f64()).collect();
        t.sort_by(f64::total_cmp);
        let p50 = t.get(t.len() / 2).copied();
        let max = t.last().copied();
        let cell = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"));
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} / {} |",
            f.label(),
            xs.len(),
            xs.iter().map(|x| x.fenced.len()).sum::<usize>(),
            xs.iter().map(|x| x.moved).sum::<usize>(),
            xs.iter().map(|x| x.double_runs.len()).sum::<usize>(),
            xs.iter().filter(|x| x.note.is_some()).count(),
            cell(p50),
            cell(max)
        );
    }
    let _ = writeln!(
        o,
        "\n<details><summary>every schedule</summary>\n\n| # | fault | node | drawn | fenced | moved | double runs | s | note |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (i, x) in outs.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |",
            i + 1,
            x.fault.label(),
            x.victim,
            x.detail,
            x.fenced.join(", "),
            x.moved,
            if x.double_runs.is_empty() {
                "0".to_owned()
            } else {
                x.double_runs.join("; ")
            },
            x.took.as_secs_f64(),
            x.note.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(o, "\n</details>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_its_draws_and_stays_in_range() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        for _ in 0..1000 {
            let (x, y) = (a.below(7), b.below(7));
            assert_eq!(x, y);
            assert!(x < 7);
            let d = a.millis(200, 600);
            assert_eq!(d, b.millis(200, 600));
            assert!((200..=600).contains(&(d.as_millis() as u64)));
        }
        assert_eq!(Rng::new(0).0, 1, "a zero seed would stay zero");
    }
}
