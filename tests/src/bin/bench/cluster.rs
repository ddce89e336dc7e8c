//! Primary-takeover figures of `debvisor-bench` (`--cluster`, issue 13, needs root): how long
//! after a fault on the primary coordinator a new primary holds the floating address, with
//! the shipped keepalive settings.
//!
//! One 3-node cluster of the multi-node harness (`debvisor_tests::cluster`: every node a
//! clustered coordinator in its own namespace on a bridge, a 3-member etcd, the invariant
//! checker sampling all along) is built once with `keepalive.interval` and
//! `keepalive.lease_ttl` of [`KeepaliveConfig::default`] and reused. Rounds of three runs,
//! one per [`Fault`] (kill -9 of the primary's daemon, its switch port down, SIGTERM), are
//! repeated `--cluster-runs` times, interleaved so the machine's load drifts over all three
//! alike. Each run waits for the steady state (one primary, alone holding the floating
//! address in the namespaces and on the wire, the other nodes alive secondaries), applies
//! the fault to the primary, waits for another node to hold the address alone, then undoes
//! the fault (restart the daemon, heal the link) and waits for the steady state again; the
//! checker's violations over the whole run, recovery included, are counted.
//!
//! Milestones of a run, all on the bench's monotonic clock (the daemons' RFC 3339 log
//! timestamps are placed on it through a wall-clock reading taken just before the fault;
//! same host clock):
//!
//! - *release*: for kill -9 and the cut, the deletion of the old primary's `alive` key as
//!   the bench's own etcd watch delivers it ([`AliveWatch`]: the lease expired on the
//!   server, which also deletes its election key) — detection; for SIGTERM, the old
//!   primary's `resigned from the election` line (duties down, key resigned);
//! - *takeover*: the new primary's `coordinator_state changed` line to `takeover` (it won the
//!   election and starts its duties);
//! - *holder*: the first checker sample in which the new primary alone holds the floating
//!   address in the node namespaces and alone answers ARP for it on the switch — the figure.
//!
//! The phases between them ([`phases`]) are detection (or release), election and duty
//! bring-up.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use debvisor_daemon::config::KeepaliveConfig;
use debvisor_tests::cluster::{
    wait_until, Checker, CheckerStats, Cluster, Holding, Node, KEY_PREFIX,
};
use etcd_client::{Client, EventType, WatchOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::clock::{epoch_micros, now_utc_string, parse_rfc3339_micros};
use super::host::{load_fmt, load_triple, loadavg, render_load, render_stopped};
use super::logs::str_field;
use super::report::{bench_command, publish, Machine};
use super::stats::{nearest_rank, summarize, verdict};
use crate::{Args, BenchResult};

/// Start marker of the generated section in `docs/benchmarks.md`.
const MARK_START: &str = "<!-- bench:cluster:start -->";
/// End marker of the generated section in `docs/benchmarks.md`.
const MARK_END: &str = "<!-- bench:cluster:end -->";
/// Nodes (all coordinators) and etcd members of the cluster.
const NODES: usize = 3;
const ETCD_MEMBERS: usize = 3;
/// How long a run may take to show a new holder before it counts as failed (a deadline,
/// not a speed claim: the targets are far below).
const TAKEOVER_DEADLINE: Duration = Duration::from_secs(90);
/// How long the cluster may take to settle back after a run.
const SETTLE: Duration = Duration::from_secs(120);
/// How long a restarted daemon may take to reach `run`.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// The SIGTERM target of the issue: a planned handover within a second.
const HANDOVER_TARGET: Duration = Duration::from_secs(1);
/// What the issue allows a kill or a cut beyond the lease TTL.
const TTL_SLACK: Duration = Duration::from_secs(2);
/// The message of the election's state transitions (a failed write logs a longer one).
const STATE_CHANGED: &str = "coordinator_state changed";

/// A fault applied to the primary in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL of the primary's daemon (its guardian drops the duties; the lease runs out).
    Kill,
    /// The primary's switch port down (it demotes itself before its lease can expire).
    Cut,
    /// SIGTERM of the primary's daemon: a planned handover (relinquish, resign).
    Term,
}

impl Fault {
    /// The faults of one round, in the order they run.
    const ALL: [Fault; 3] = [Fault::Kill, Fault::Cut, Fault::Term];

    /// Name in the tables.
    fn label(self) -> &'static str {
        match self {
            Fault::Kill => "`kill -9` of the primary's daemon",
            Fault::Cut => "the primary's link cut",
            Fault::Term => "SIGTERM of the primary (planned handover)",
        }
    }

    /// Short name for the per-run table and the progress lines.
    fn short(self) -> &'static str {
        match self {
            Fault::Kill => "kill -9",
            Fault::Cut => "link cut",
            Fault::Term => "SIGTERM",
        }
    }

    /// The issue's target for fault → new holder.
    fn target(self, lease_ttl: Duration) -> Duration {
        match self {
            Fault::Term => HANDOVER_TARGET,
            Fault::Kill | Fault::Cut => lease_ttl + TTL_SLACK,
        }
    }

    /// The names of the three phases (see [`phases`]).
    fn phase_names(self) -> [&'static str; 3] {
        match self {
            Fault::Kill | Fault::Cut => [
                "detection: fault → old primary's `alive` key deleted (lease expired)",
                "election: → new primary's `coordinator_state` `takeover` line",
                "duty bring-up: → checker sees it sole holder (namespaces and wire)",
            ],
            Fault::Term => [
                "release: SIGTERM → old primary's `resigned from the election` line",
                "election: → new primary's `coordinator_state` `takeover` line",
                "duty bring-up: → checker sees it sole holder (namespaces and wire)",
            ],
        }
    }
}

/// What one run measured; times are milliseconds after the fault.
#[derive(Debug, Clone)]
struct Run {
    fault: Fault,
    /// The primary the fault hit.
    old: String,
    /// The node that took over (`None`: nobody within [`TAKEOVER_DEADLINE`]).
    new: Option<String>,
    /// Fault → the new primary sole holder (the figure).
    total: Option<f64>,
    /// The release and takeover milestones (see the module documentation).
    marks: [Option<f64>; 2],
    /// The new primary's `coordinator_state changed` line to `primary` (duties up, as the
    /// daemon tells it).
    primary_line: Option<f64>,
    /// SIGTERM only: the old daemon's `debvisord stopped` line.
    stopped_line: Option<f64>,
    /// The checker's violations over the run, recovery included.
    violations: Vec<String>,
    /// The 1-minute load average when the run began.
    load: f64,
}

/// What the watch thread of [`AliveWatch`] shares with the bench.
#[derive(Clone, Default)]
struct WatchState {
    /// Deletions of `alive` keys: the node and when the watch delivered it.
    gone: Arc<Mutex<Vec<(String, Instant)>>>,
    /// Whether the watch is open now.
    live: Arc<AtomicBool>,
    /// How often it broke and was reopened.
    reopened: Arc<AtomicU64>,
}

/// Deletions of `nodes/<node>/alive` as the bench's own etcd watch delivers them, with the
/// instant each arrived: when the cluster saw a node's lease expire. The watch runs on a
/// thread of its own in the switch namespace (where the etcd members are reachable) and is
/// reopened if it breaks (counted: a deletion during the gap is then seen late or not at
/// all).
pub(crate) struct AliveWatch {
    state: WatchState,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl AliveWatch {
    /// Start watching the cluster's etcd; returns once the watch is open.
    pub(crate) fn start(c: &Cluster) -> BenchResult<AliveWatch> {
        let ns = c.switch().netns().name().to_owned();
        let endpoints = c.etcd().endpoints();
        let (state, stop) = (WatchState::default(), CancellationToken::new());
        let (st, stopped) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("alive watch".into())
            .spawn(move || watch_thread(&ns, endpoints, st, stopped))
            .map_err(|e| format!("spawning the alive watch: {e}"))?;
        let w = AliveWatch {
            state,
            stop,
            thread: Some(thread),
        };
        w.wait_live()?;
        Ok(w)
    }

    /// Wait until the watch is open (it may be reopening after a break).
    pub(crate) fn wait_live(&self) -> BenchResult<()> {
        wait_until("the alive watch open", Duration::from_secs(20), || {
            self.state.live.load(Ordering::SeqCst).then_some(())
        })
        .map_err(|e| e.to_string())
    }

    /// The first deletion of `node`'s `alive` key that arrived after `after`.
    pub(crate) fn gone_after(&self, node: &str, after: Instant) -> Option<Instant> {
        let gone = self.state.gone.lock().unwrap_or_else(|p| p.into_inner());
        gone.iter()
            .find(|(n, at)| n == node && *at >= after)
            .map(|(_, at)| *at)
    }

    /// How often the watch had to be reopened.
    pub(crate) fn reopened(&self) -> u64 {
        self.state.reopened.load(Ordering::SeqCst)
    }
}

impl Drop for AliveWatch {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("debvisor-bench: the alive watch thread panicked");
            }
        }
    }
}

/// The body of the watch thread: enter the switch namespace `ns`, run [`watch_alive`] on a
/// runtime of its own until `stop`.
fn watch_thread(ns: &str, endpoints: Vec<String>, st: WatchState, stop: CancellationToken) {
    if let Err(e) = debvisor_tests::netns::enter_thread(ns) {
        eprintln!("debvisor-bench: alive watch: {e}");
        return;
    }
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(watch_alive(endpoints, st, stop)),
        Err(e) => eprintln!("debvisor-bench: alive watch runtime: {e}"),
    }
}

/// The node of an `alive` key (`/debvisor/nodes/<node>/alive`), `None` for any other key.
fn alive_key_node(key: &str) -> Option<&str> {
    let node = key
        .strip_prefix(KEY_PREFIX)?
        .strip_prefix("nodes/")?
        .strip_suffix("/alive")?;
    (!node.is_empty() && !node.contains('/')).then_some(node)
}

/// The watch loop of [`AliveWatch`]: [`watch_once`], reopen after a break, until `stop`.
async fn watch_alive(endpoints: Vec<String>, st: WatchState, stop: CancellationToken) {
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = watch_once(&endpoints, &st) => r,
        };
        st.live.store(false, Ordering::SeqCst);
        st.reopened.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = r {
            eprintln!("debvisor-bench: alive watch broke ({e}); reopening");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Open one watch on the nodes' keys and record the deletions of `alive` keys until it
/// breaks (always an error: the stream does not end by itself).
async fn watch_once(endpoints: &[String], st: &WatchState) -> Result<(), String> {
    let prefix = format!("{KEY_PREFIX}nodes/");
    let mut c = Client::connect(endpoints.to_vec(), None)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let mut s = c
        .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .map_err(|e| format!("watching {prefix}: {e}"))?;
    loop {
        let msg = s
            .message()
            .await
            .map_err(|e| format!("watch {prefix}: {e}"))?
            .ok_or_else(|| format!("watch {prefix}: stream closed"))?;
        let at = Instant::now();
        if msg.created() {
            st.live.store(true, Ordering::SeqCst);
        }
        if msg.canceled() {
            return Err(format!("watch canceled by etcd: {}", msg.cancel_reason()));
        }
        let deleted = msg
            .events()
            .iter()
            .filter(|ev| ev.event_type() == EventType::Delete)
            .filter_map(|ev| ev.kv())
            .filter_map(|kv| alive_key_node(&String::from_utf8_lossy(kv.key())).map(str::to_owned));
        let mut gone = st.gone.lock().unwrap_or_else(|p| p.into_inner());
        gone.extend(deleted.map(|node| (node, at)));
    }
}

/// The instant `node` became the sole holder of an address both in the namespaces and on the
/// wire (the later of the two), `None` while it is not.
fn sole_holder_since(h: &Holding, node: &str) -> Option<Instant> {
    (h.sole() == Some(node) && h.wire.len() == 1 && h.wire[0] == node)
        .then(|| h.since.max(h.wire_since))
}

/// Split the time from the fault to the final milestone `total` at the intermediate
/// milestones `marks` (each in ms after the fault, in causal order; `None` when not seen):
/// one phase per gap. A milestone earlier than the one before it (clocks and sampling do
/// not line up exactly) or later than `total` is clamped into place, so the phases that are
/// known add up to `total`; a phase next to an unseen milestone is `None`.
pub(crate) fn phases(marks: &[Option<f64>], total: f64) -> Vec<Option<f64>> {
    let mut out = Vec::with_capacity(marks.len() + 1);
    let mut floor = 0.0_f64;
    let mut prev = Some(0.0_f64);
    for m in marks.iter().copied().chain(std::iter::once(Some(total))) {
        let m = m.map(|x| x.max(floor).min(total));
        out.push(prev.zip(m).map(|(a, b)| b - a));
        if let Some(x) = m {
            floor = x;
        }
        prev = m;
    }
    out
}

/// The timestamp (µs since the epoch) of the first log line at or after `after` (µs since
/// the epoch) that `pred` accepts.
pub(crate) fn first_line_at(
    lines: &[Value],
    after: i64,
    pred: impl Fn(&Value) -> bool,
) -> Option<i64> {
    lines.iter().find_map(|v| {
        let ts = str_field(v, "timestamp").and_then(parse_rfc3339_micros)?;
        (ts >= after && pred(v)).then_some(ts)
    })
}

/// An election transition line to `to` (also the one whose etcd write failed).
fn state_change_to(v: &Value, to: &str) -> bool {
    str_field(v, "message").is_some_and(|m| m.starts_with(STATE_CHANGED))
        && str_field(v, "to") == Some(to)
}

/// A line whose message is `m`.
pub(crate) fn message_is(v: &Value, m: &str) -> bool {
    str_field(v, "message") == Some(m)
}

/// Milliseconds from `from` to `to` (negative if `to` is earlier).
pub(crate) fn ms_between(from: Instant, to: Instant) -> f64 {
    match to.checked_duration_since(from) {
        Some(d) => d.as_secs_f64() * 1000.0,
        None => -(from.duration_since(to).as_secs_f64() * 1000.0),
    }
}

/// p50 (median), p95 (nearest rank), min and max of `xs`; NaN when empty.
pub(crate) fn dist(xs: &[f64]) -> [f64; 4] {
    let s = summarize(xs);
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    [
        s.median,
        nearest_rank(&v, 0.95).unwrap_or(f64::NAN),
        s.min,
        s.max,
    ]
}

/// The node named `name`, or an error naming it.
pub(crate) fn node<'a>(c: &'a Cluster, name: &str) -> BenchResult<&'a Node> {
    c.node_named(name)
        .ok_or_else(|| format!("no node named {name}"))
}

/// Wait until one node is primary and alone holds `fl` (namespaces and wire) and every other
/// node runs, holds a lease and is `secondary`; the primary's name.
fn steady(c: &Cluster, fl: IpAddr) -> BenchResult<String> {
    wait_until(
        "one primary alone holding the floating address, the other nodes alive secondaries",
        SETTLE,
        || {
            if !c.nodes().iter().all(Node::is_running) {
                return None;
            }
            let h = c.checker().holder_of(fl);
            let p = h.sole()?.to_owned();
            sole_holder_since(&h, &p)?;
            if c.alive_nodes().ok()?.len() != c.nodes().len() {
                return None;
            }
            let states = c.coordinator_states().ok()?;
            c.nodes()
                .iter()
                .all(|n| {
                    let want = if n.name() == p {
                        "primary"
                    } else {
                        "secondary"
                    };
                    states.get(n.name()).map(String::as_str) == Some(want)
                })
                .then_some(p)
        },
    )
    .map_err(|e| format!("the cluster did not settle: {e}"))
}

/// A fault as applied: when, on the bench's monotonic clock and on the wall clock of the
/// daemons' log timestamps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Applied {
    /// The instant the harness applied it.
    pub(crate) at: Instant,
    /// The same instant in µs since the epoch: a wall-clock reading taken just before,
    /// moved on by the monotonic time in between.
    pub(crate) wall: i64,
}

impl Applied {
    /// A fault applied at `at`, given a monotonic `anchor` and the wall clock read with it
    /// (µs since the epoch) just before.
    pub(crate) fn at(anchor: Instant, anchor_wall: i64, at: Instant) -> Applied {
        let after = i64::try_from(at.saturating_duration_since(anchor).as_micros()).unwrap_or(0);
        Applied {
            at,
            wall: anchor_wall.saturating_add(after),
        }
    }

    /// Milliseconds from the fault to `t`.
    pub(crate) fn ms_to(&self, t: Instant) -> f64 {
        ms_between(self.at, t)
    }

    /// Milliseconds from the fault to a log timestamp `ts` (µs since the epoch).
    pub(crate) fn ms_to_wall(&self, ts: i64) -> f64 {
        (ts - self.wall) as f64 / 1000.0
    }
}

/// Apply `fault` to `victim`, the primary.
fn apply_fault(victim: &Node, fault: Fault) -> BenchResult<Applied> {
    let (anchor, anchor_wall) = (Instant::now(), epoch_micros(SystemTime::now()));
    let at = match fault {
        Fault::Kill => victim.kill9(),
        Fault::Cut => victim.cut_link(),
        Fault::Term => victim.sigterm(),
    }
    .map_err(|e| format!("{} of {}: {e}", fault.short(), victim.name()))?;
    Ok(Applied::at(anchor, anchor_wall, at))
}

/// The figure: wait until a node other than `old` alone holds `fl`, in the namespaces and on
/// the wire, as the checker samples it; that node and since when (`None`: nobody within
/// [`TAKEOVER_DEADLINE`]).
fn wait_new_holder(checker: &Checker, fl: IpAddr, old: &str) -> Option<(String, Instant)> {
    wait_until("another node alone holding it", TAKEOVER_DEADLINE, || {
        let h = checker.holder_of(fl);
        let n = h.sole().filter(|n| *n != old)?;
        sole_holder_since(&h, n).map(|t| (n.to_owned(), t))
    })
    .ok()
}

/// The new primary's first `takeover` and `primary` transition lines after the fault, in ms
/// after it.
fn new_primary_lines(new: &Node, f: Applied) -> (Option<f64>, Option<f64>) {
    // The `primary` line follows the duties; give it a moment if not there yet.
    let _ = new.wait_log("the primary line", Duration::from_secs(10), |v| {
        state_change_to(v, "primary")
            && str_field(v, "timestamp")
                .and_then(parse_rfc3339_micros)
                .is_some_and(|ts| ts >= f.wall)
    });
    let lines = new.json_lines();
    let line =
        |to| first_line_at(&lines, f.wall, |v| state_change_to(v, to)).map(|ts| f.ms_to_wall(ts));
    (line("takeover"), line("primary"))
}

/// Start `victim`'s daemon again and wait until it runs.
fn restart(victim: &Node) -> BenchResult<()> {
    victim
        .start()
        .and_then(|_| victim.wait_run(RUN_TIMEOUT))
        .map_err(|e| format!("restarting {}: {e}", victim.name()))
}

/// Undo a kill -9 or a cut once the old primary's lease is gone (restart its daemon, heal
/// its link); the detection milestone: when the watch saw its `alive` key deleted, in ms
/// after the fault.
fn undo_expiry(
    victim: &Node,
    watch: &AliveWatch,
    fault: Fault,
    f: Applied,
) -> BenchResult<Option<f64>> {
    let gone = wait_until("the old primary's alive key deleted", SETTLE, || {
        watch.gone_after(victim.name(), f.at)
    })
    .ok()
    .map(|t| f.ms_to(t));
    if fault == Fault::Cut {
        victim
            .heal_link()
            .map_err(|e| format!("healing {}: {e}", victim.name()))?;
    } else {
        restart(victim)?;
    }
    Ok(gone)
}

/// Undo a SIGTERM: wait for the old daemon's exit, read its `resigned from the election`
/// and `debvisord stopped` lines (ms after the fault), start it again.
fn undo_term(victim: &Node, f: Applied) -> BenchResult<(Option<f64>, Option<f64>)> {
    victim
        .wait_exit(SETTLE)
        .map_err(|e| format!("{} to exit after SIGTERM: {e}", victim.name()))?;
    let lines = victim.json_lines();
    let line = |m| first_line_at(&lines, f.wall, |v| message_is(v, m)).map(|ts| f.ms_to_wall(ts));
    let marks = (
        line("resigned from the election"),
        line("debvisord stopped"),
    );
    restart(victim)?;
    Ok(marks)
}

/// One run of `fault` on the current primary, recovery included.
fn one_run(c: &Cluster, watch: &AliveWatch, fl: IpAddr, fault: Fault) -> BenchResult<Run> {
    let old = steady(c, fl)?;
    watch.wait_live()?;
    let before = c.checker().violations().len();
    let load = loadavg();
    let victim = node(c, &old)?;
    let f = apply_fault(victim, fault)?;
    let held = wait_new_holder(c.checker(), fl, &old);
    let mut run = Run {
        fault,
        old,
        new: held.as_ref().map(|(n, _)| n.clone()),
        total: held.as_ref().map(|(_, t)| f.ms_to(*t)),
        marks: [None, None],
        primary_line: None,
        stopped_line: None,
        violations: Vec::new(),
        load,
    };
    if let Some(new) = &run.new {
        (run.marks[1], run.primary_line) = new_primary_lines(node(c, new)?, f);
    }
    match fault {
        Fault::Kill | Fault::Cut => run.marks[0] = undo_expiry(victim, watch, fault, f)?,
        Fault::Term => (run.marks[0], run.stopped_line) = undo_term(victim, f)?,
    }
    steady(c, fl)?;
    run.violations = c
        .checker()
        .violations()
        .iter()
        .skip(before)
        .map(ToString::to_string)
        .collect();
    Ok(run)
}

/// The progress line of a finished run, on stderr.
fn progress(round: usize, rounds: usize, r: &Run) {
    eprintln!(
        "debvisor-bench: [cluster] {}/{rounds} {}: {} → {}: {} (violations {})",
        round + 1,
        r.fault.short(),
        r.old,
        r.new.as_deref().unwrap_or("nobody"),
        r.total
            .map_or_else(|| "no takeover".to_owned(), |t| format!("{t:.0} ms")),
        r.violations.len()
    );
}

/// `--cluster-runs` rounds of one run per fault; the runs done and, if a run could not be
/// carried out (the cluster did not settle, a restart failed), the error that stopped them.
fn rounds(args: &Args, c: &Cluster, watch: &AliveWatch, fl: IpAddr) -> (Vec<Run>, Option<String>) {
    let mut runs = Vec::new();
    for round in 0..args.cluster_runs {
        for fault in Fault::ALL {
            match one_run(c, watch, fl, fault) {
                Ok(r) => {
                    progress(round, args.cluster_runs, &r);
                    runs.push(r);
                }
                Err(e) => {
                    let e = format!("round {}, {}: {e}", round + 1, fault.short());
                    return (runs, Some(e));
                }
            }
        }
    }
    (runs, None)
}

/// The checker's cost for the report.
fn checker_summary(stats: &CheckerStats) -> String {
    format!(
        "{} samples, {:.0} ms mean and {:.0} ms longest sample, {} without an etcd answer, {} \
         with another error",
        stats.samples,
        stats.mean.as_secs_f64() * 1000.0,
        stats.max.as_secs_f64() * 1000.0,
        stats.etcd_failures,
        stats.errors
    )
}

/// The cluster of the figures: [`NODES`] coordinators, [`ETCD_MEMBERS`] etcd members, the
/// keepalive settings `ka`.
fn build_cluster(ka: &KeepaliveConfig) -> BenchResult<(Cluster, IpAddr)> {
    let c = Cluster::builder()
        .nodes(NODES)
        .etcd_members(ETCD_MEMBERS)
        .keepalive(ka.interval, ka.lease_ttl)
        .build()
        .map_err(|e| format!("building the cluster: {e}"))?;
    let fl = IpAddr::from(c.floating().ok_or("the cluster has no floating address")?);
    Ok((c, fl))
}

/// Run the figures, print them and (unless `--no-write`) write their section of the docs.
/// Runs done before a failure are still reported; the failure is then the result.
pub(crate) fn run(args: &Args, machine: &Machine) -> BenchResult<()> {
    if !debvisor_tests::is_root() {
        return Err("the cluster figures need root (network namespaces)".into());
    }
    // Build the daemon (same profile as this executable) before any timing starts.
    let daemon_bin = debvisor_tests::bin_path("debvisord");
    eprintln!("debvisor-bench: daemon binary {}", daemon_bin.display());
    let ka = KeepaliveConfig::default();
    let (started, load_start, t0) = (now_utc_string(), load_triple(), Instant::now());
    eprintln!(
        "debvisor-bench: [cluster] {NODES} nodes, {ETCD_MEMBERS} etcd members, keepalive {:?} / \
         lease {:?}, {} runs of each fault; /proc/loadavg {load_start}",
        ka.interval, ka.lease_ttl, args.cluster_runs
    );
    let (c, fl) = build_cluster(&ka)?;
    let watch = AliveWatch::start(&c)?;
    let (runs, stopped) = rounds(args, &c, &watch, fl);
    let setup = Setup {
        ka,
        load: (load_start, load_triple()),
        took: t0.elapsed(),
        checker: checker_summary(&c.checker().stats()),
        reopened: watch.reopened(),
        stopped: stopped.clone(),
    };
    drop(watch);
    drop(c);
    publish(
        args,
        MARK_START,
        MARK_END,
        &render(args, machine, &started, &setup, &runs),
    )?;
    stopped.map_or(Ok(()), |e| {
        Err(format!("the cluster figures stopped early: {e}"))
    })
}

/// What the report says about the setup besides the runs.
struct Setup {
    /// The keepalive settings the daemons ran with (the shipped defaults).
    ka: KeepaliveConfig,
    /// `/proc/loadavg` (1, 5, 15 min) before and after the runs.
    load: (String, String),
    /// The whole bench, cluster bring-up included.
    took: Duration,
    /// The checker's cost ([`checker_summary`]).
    checker: String,
    /// How often the alive watch was reopened.
    reopened: u64,
    /// The error that stopped the runs early, if one did.
    stopped: Option<String>,
}

/// Seconds with two decimals (`–` for NaN).
pub(crate) fn secs(ms: f64) -> String {
    if ms.is_nan() {
        "–".into()
    } else {
        format!("{:.2}", ms / 1000.0)
    }
}

/// [`secs`] of a figure that may be missing.
pub(crate) fn opt_secs(ms: Option<f64>) -> String {
    ms.map_or_else(|| "–".into(), secs)
}

/// The whole section: setup, the figure per fault, where the time goes, every run.
fn render(args: &Args, m: &Machine, started: &str, s: &Setup, runs: &[Run]) -> String {
    let mut o = String::new();
    render_setup(&mut o, args, m, started, s, runs);
    render_method(&mut o, args, s);
    render_totals(&mut o, s, runs);
    render_phases(&mut o, s, runs);
    render_notes(&mut o, s);
    render_runs(&mut o, runs);
    o
}

/// The heading and the bullets on the command, machine, cluster, checker and load.
fn render_setup(o: &mut String, args: &Args, m: &Machine, started: &str, s: &Setup, runs: &[Run]) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "### Primary takeover: fault → new primary holding the floating address ({started})\n"
    );
    let _ = writeln!(o, "- command: `{}`", bench_command(args, m));
    let _ = writeln!(o, "- machine: {m}; profile `{}`", m.profile);
    let _ = writeln!(
        o,
        "- cluster: {NODES} nodes (all coordinators, `node.mode: clustered`), each `debvisord` \
         in its own network namespace on a bridge, {ETCD_MEMBERS}-member etcd 3.4, floating \
         address {} on the cluster network; the shipped keepalive defaults: interval {:?}, \
         lease TTL {:?}, demote margin {:?} (`KeepaliveConfig::default()`)",
        debvisor_tests::cluster::DEFAULT_FLOATING,
        s.ka.interval,
        s.ka.lease_ttl,
        s.ka.demote_margin()
    );
    let _ = writeln!(
        o,
        "- checker (samples every 75 ms: address dump of every namespace, ARP on the switch, \
         etcd, `/proc`): {}",
        s.checker
    );
    render_load(o, &s.load, runs.iter().map(|r| r.load), s.took);
}

/// How a run goes and what is measured.
fn render_method(o: &mut String, args: &Args, s: &Setup) {
    use std::fmt::Write as _;
    render_stopped(o, s.stopped.as_deref());
    let _ = writeln!(
        o,
        "{} rounds asked, each one run per fault in this order, on whichever node is primary; \
         between runs the old primary is restarted (kill -9, SIGTERM) or its link healed, \
         and the next run waits until one primary alone holds the address and the other \
         nodes are alive secondaries. *Fault → new holder*: the instant the fault was \
         applied → the first checker sample in which another node alone holds the floating \
         address in the node namespaces *and* alone answers ARP for it on the switch (sample \
         resolution ~75 ms; both on the bench's monotonic clock). *Violations*: episodes the \
         checker recorded during the run, recovery included (two holders of the address in \
         the namespaces or on the wire, two primaries, two dnsmasq for one network). \
         Verdict: p95 within the target, every run took over, no violation. Targets of the \
         issue: SIGTERM ≤ {:?}; kill/cut ≤ lease TTL + {:?} = {:?}.\n",
        args.cluster_runs,
        HANDOVER_TARGET,
        TTL_SLACK,
        s.ka.lease_ttl + TTL_SLACK
    );
}

/// The figure: fault → new holder per fault, against its target.
fn render_totals(o: &mut String, s: &Setup, runs: &[Run]) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "| fault → new holder (s) | runs | p50 | p95 | min | max | target | over target | \
         violations | verdict |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for f in Fault::ALL {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.fault == f).collect();
        let totals: Vec<f64> = mine.iter().filter_map(|r| r.total).collect();
        let target = f.target(s.ka.lease_ttl);
        let target_ms = target.as_secs_f64() * 1000.0;
        let over = totals.iter().filter(|t| **t > target_ms).count();
        let violations: usize = mine.iter().map(|r| r.violations.len()).sum();
        let [p50, p95, min, max] = dist(&totals);
        let ok =
            !mine.is_empty() && totals.len() == mine.len() && p95 <= target_ms && violations == 0;
        let _ = writeln!(
            o,
            "| {} | {}/{} | {} | **{}** | {} | {} | ≤ {:.0} | {over} | {violations} | **{}** |",
            f.label(),
            totals.len(),
            mine.len(),
            secs(p50),
            secs(p95),
            secs(min),
            secs(max),
            target.as_secs_f64(),
            verdict(ok)
        );
    }
}

/// The phases of `f`'s runs and the daemons' own view, as (row name, values in ms).
fn phase_rows(f: Fault, runs: &[Run]) -> Vec<(String, Vec<f64>)> {
    let mine: Vec<&Run> = runs.iter().filter(|r| r.fault == f).collect();
    let split: Vec<Vec<Option<f64>>> = mine
        .iter()
        .filter_map(|r| r.total.map(|t| phases(&r.marks, t)))
        .collect();
    let mut rows: Vec<(String, Vec<f64>)> = f
        .phase_names()
        .iter()
        .enumerate()
        .map(|(i, name)| {
            (
                (*name).to_owned(),
                split.iter().filter_map(|p| p[i]).collect(),
            )
        })
        .collect();
    rows.push((
        "(daemon's view) takeover line → `primary` line (duties up)".into(),
        mine.iter()
            .filter_map(|r| r.primary_line.zip(r.marks[1]).map(|(p, t)| p - t))
            .collect(),
    ));
    if f == Fault::Term {
        rows.push((
            "(old daemon) SIGTERM → `debvisord stopped`".into(),
            mine.iter().filter_map(|r| r.stopped_line).collect(),
        ));
    }
    rows
}

/// Where the time goes: the phases per fault.
fn render_phases(o: &mut String, s: &Setup, runs: &[Run]) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "\nWhere the time goes. Detection is the old primary's `alive` key deleted, as the \
         bench's own etcd watch (from the switch namespace) delivers it: the lease expired \
         on the server, which deletes the old election key with it (the watch was reopened \
         {} times). Election and bring-up are read from the new primary's log (daemon \
         timestamps, same host clock, placed on the bench's clock by a reading taken at the \
         fault). A milestone that the sampling puts before the previous one is clamped \
         (phase 0).\n",
        s.reopened
    );
    let _ = writeln!(o, "| fault | phase (s) | p50 | p95 | min | max |");
    let _ = writeln!(o, "|---|---|---:|---:|---:|---:|");
    for f in Fault::ALL {
        for (name, xs) in phase_rows(f, runs) {
            let [p50, p95, min, max] = dist(&xs);
            let _ = writeln!(
                o,
                "| {} | {name} ({} runs) | {} | {} | {} | {} |",
                f.short(),
                xs.len(),
                secs(p50),
                secs(p95),
                secs(min),
                secs(max)
            );
        }
    }
}

/// Why the figures are what they are, and the PVC anchor.
fn render_notes(o: &mut String, s: &Setup) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "\nA kill -9 or a cut is detected when the old primary's lease expires: {:?} after its \
         last refresh, and refreshes come every TTL/3 ({:?}), so detection lands between \
         TTL − TTL/3 and TTL after the fault (plus etcd's lease expiry check). A cut-off \
         primary drops its duties by itself {:?} before its lease can expire (demote \
         margin), a killed one through its guardian at once, so nobody else holds the \
         address when another node wins. SIGTERM needs no expiry: the primary tears its \
         duties down and resigns, and the next coordinator in the line wins at once. \
         Reference: PVC declares a node dead after a 30 s timeout and then runs its \
         takeover with fixed sleeps, so a crashed or cut-off primary costs it more than 30 s.\n",
        s.ka.lease_ttl,
        s.ka.lease_ttl / 3,
        s.ka.demote_margin()
    );
}

/// One row of the every-run table.
fn run_row(i: usize, r: &Run) -> String {
    let p = r
        .total
        .map(|t| phases(&r.marks, t))
        .unwrap_or_else(|| vec![None; 3]);
    let v = if r.violations.is_empty() {
        "0".to_owned()
    } else {
        format!("{}: {}", r.violations.len(), r.violations.join("; "))
    };
    format!(
        "| {} | {} | {} → {} | {} | {} | {} | {} | {} | {v} |",
        i + 1,
        r.fault.short(),
        r.old,
        r.new.as_deref().unwrap_or("nobody"),
        opt_secs(r.total),
        opt_secs(p[0]),
        opt_secs(p[1]),
        opt_secs(p[2]),
        load_fmt(r.load)
    )
}

/// Every run, folded.
fn render_runs(o: &mut String, runs: &[Run]) {
    use std::fmt::Write as _;
    let _ = writeln!(o, "<details><summary>Every run</summary>\n");
    let _ = writeln!(
        o,
        "| # | fault | old → new | fault → holder (s) | detection / release | election | \
         bring-up | load | violations |"
    );
    let _ = writeln!(o, "|---:|---|---|---:|---:|---:|---:|---:|---|");
    for (i, r) in runs.iter().enumerate() {
        let _ = writeln!(o, "{}", run_row(i, r));
    }
    let _ = writeln!(o, "\n</details>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_split_the_total_at_the_milestones() {
        let p = phases(&[Some(100.0), Some(150.0)], 400.0);
        assert_eq!(p, vec![Some(100.0), Some(50.0), Some(250.0)]);
        // An unseen milestone leaves both phases next to it unknown.
        let p = phases(&[None, Some(150.0)], 400.0);
        assert_eq!(p, vec![None, None, Some(250.0)]);
        let p = phases(&[Some(100.0), None], 400.0);
        assert_eq!(p, vec![Some(100.0), None, None]);
        // Out of order (sampling): clamped, and the phases still add up.
        let p = phases(&[Some(200.0), Some(150.0)], 400.0);
        assert_eq!(p, vec![Some(200.0), Some(0.0), Some(200.0)]);
        let p = phases(&[Some(500.0)], 400.0);
        assert_eq!(p, vec![Some(400.0), Some(0.0)]);
        let p = phases(&[Some(-5.0)], 400.0);
        assert_eq!(p, vec![Some(0.0), Some(400.0)]);
    }

    #[test]
    fn sole_holder_needs_the_namespaces_and_the_wire() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let h = |nodes: &[&str], since, wire: &[&str], wire_since| Holding {
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            since: at(since),
            wire: wire.iter().map(|s| s.to_string()).collect(),
            wire_since: at(wire_since),
        };
        assert_eq!(
            sole_holder_since(&h(&["c2"], 10, &["c2"], 30), "c2"),
            Some(at(30))
        );
        assert_eq!(
            sole_holder_since(&h(&["c2"], 40, &["c2"], 30), "c2"),
            Some(at(40))
        );
        assert_eq!(sole_holder_since(&h(&["c2"], 10, &[], 30), "c2"), None);
        assert_eq!(
            sole_holder_since(&h(&["c2"], 10, &["c1", "c2"], 30), "c2"),
            None
        );
        assert_eq!(
            sole_holder_since(&h(&["c1", "c2"], 10, &["c2"], 30), "c2"),
            None
        );
        assert_eq!(sole_holder_since(&h(&["c2"], 10, &["c2"], 30), "c1"), None);
    }

    #[test]
    fn log_milestones_after_the_fault() {
        let lines: Vec<Value> = [
            r#"{"timestamp":"2026-01-01T00:00:01Z","message":"coordinator_state changed","to":"takeover"}"#,
            r#"{"timestamp":"2026-01-01T00:00:05Z","message":"coordinator_state changed","to":"primary"}"#,
            r#"{"timestamp":"2026-01-01T00:00:09.5Z","message":"coordinator_state changed; not written yet (repaired on a later tick)","to":"takeover"}"#,
            r#"{"message":"no timestamp","to":"takeover"}"#,
        ]
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
        let at = |s: &str| parse_rfc3339_micros(s).expect("timestamp");
        let after = at("2026-01-01T00:00:02Z");
        assert_eq!(
            first_line_at(&lines, after, |v| state_change_to(v, "takeover")),
            Some(at("2026-01-01T00:00:09.5Z"))
        );
        assert_eq!(
            first_line_at(&lines, 0, |v| state_change_to(v, "takeover")),
            Some(at("2026-01-01T00:00:01Z"))
        );
        assert_eq!(
            first_line_at(&lines, after, |v| state_change_to(v, "primary")),
            Some(at("2026-01-01T00:00:05Z"))
        );
        assert_eq!(
            first_line_at(&lines, after, |v| message_is(v, "debvisord stopped")),
            None
        );
    }

    #[test]
    fn alive_keys_and_small_helpers() {
        assert_eq!(alive_key_node("/debvisor/nodes/c1/alive"), Some("c1"));
        assert_eq!(alive_key_node("/debvisor/nodes/c1/coordinator_state"), None);
        assert_eq!(alive_key_node("/debvisor/nodes/c1/x/alive"), None);
        assert_eq!(alive_key_node("/debvisor/nodes//alive"), None);
        assert_eq!(alive_key_node("/other/nodes/c1/alive"), None);
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!(ms_between(t0, t1), 1500.0);
        assert_eq!(ms_between(t1, t0), -1500.0);
        let d = dist(&(1..=20).map(f64::from).collect::<Vec<_>>());
        assert_eq!(d, [10.5, 19.0, 1.0, 20.0]);
        assert!(dist(&[]).iter().all(|x| x.is_nan()));
        assert_eq!(secs(1234.0), "1.23");
        assert_eq!(secs(f64::NAN), "–");
        assert_eq!(
            Fault::Kill.target(Duration::from_secs(15)),
            Duration::from_secs(17)
        );
        assert_eq!(Fault::Term.target(Duration::from_secs(15)), HANDOVER_TARGET);
    }
}
