//! The invariant checker: a background thread that samples the cluster every ~75 ms while a
//! test runs and records every moment two holders existed at once.
//!
//! Invariants (each "at most one"):
//! - a watched address (the configured floating address, any address a node marked as
//!   floating or as a client network's gateway — `proto 220`/`221`, see
//!   `debvisor_netconf::AddrOwner::primary_only` — and whatever the
//!   test adds with [`Checker::watch`]) is on at most one node, seen two ways: in the node
//!   namespaces (rtnetlink address dump of each, what `ip -j addr` shows) and on the wire (ARP
//!   requests broadcast from the switch: the MACs that answer; IPv4 addresses of the cluster
//!   subnet only, the others are not on the switch);
//! - at most one node holding a lease (`alive`) has `coordinator_state = primary` in etcd (read from the first member
//!   that answers);
//! - at most one dnsmasq serves each network, over all node namespaces together.
//!
//! A SIGSTOPped or cut-off node still holds what it held: the checker reports what is in the
//! namespaces and on the wire, so a takeover that does not wait for the old holder to be
//! fenced shows up as a violation.
//!
//! A violation is recorded once per episode: from the first sample that saw it
//! ([`Violation::first_seen`]) to the last ([`Violation::last_seen`]); a change of holders
//! starts a new episode.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::procs::DnsmasqProc;
use super::{lock, wait_until};
use crate::error::Result;

/// Which invariant a [`Violation`] breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ViolationKind {
    /// Two or more node namespaces hold the same watched address.
    AddressInNamespaces,
    /// Two or more MACs answered ARP for the same watched address on the switch.
    AddressOnWire,
    /// Two or more nodes have `coordinator_state = primary` in etcd.
    Primary,
    /// Two or more dnsmasq processes serve the same network.
    Dnsmasq,
}

/// One episode of a broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The invariant.
    pub kind: ViolationKind,
    /// What is held twice: the address, `coordinator_state`, or `network <vni>`.
    pub subject: String,
    /// Who held it: node names (on the wire a MAC no node has is shown as the MAC; for
    /// dnsmasq `<node> pid <pid>`), sorted.
    pub holders: Vec<String>,
    /// The first sample that saw it.
    pub first_seen: Instant,
    /// The last sample that saw it (the same holders).
    pub last_seen: Instant,
    /// How many samples saw it.
    pub samples: u64,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{:?} {}: held by {} ({} samples over {:?})",
            self.kind,
            self.subject,
            self.holders.join(", "),
            self.samples,
            self.last_seen.duration_since(self.first_seen)
        )
    }
}

/// Who holds something now, and since when the checker sees it that way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// Holders in the node namespaces (or in etcd for [`Checker::primary`]), sorted.
    pub nodes: Vec<String>,
    /// The sample at which `nodes` last changed (the checker's start if it never did).
    pub since: Instant,
    /// Who answered ARP for it on the switch (node names, or MACs no node has), sorted;
    /// empty for addresses not on the cluster subnet and for [`Checker::primary`].
    pub wire: Vec<String>,
    /// The sample at which `wire` last changed.
    pub wire_since: Instant,
}

impl Holding {
    fn new(at: Instant) -> Holding {
        Holding {
            nodes: Vec::new(),
            since: at,
            wire: Vec::new(),
            wire_since: at,
        }
    }

    /// The single holder in the namespaces, `None` if none or several.
    pub fn sole(&self) -> Option<&str> {
        match self.nodes.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// What the sampling costs (wall time of one sample, ARP window included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckerStats {
    /// Samples taken.
    pub samples: u64,
    /// Mean wall time of a sample.
    pub mean: Duration,
    /// Longest sample.
    pub max: Duration,
    /// Samples in which no etcd member answered (the primary view kept its last value).
    pub etcd_failures: u64,
    /// Samples in which some other part failed (a namespace dump, the ARP socket).
    pub errors: u64,
    /// The last such error.
    pub last_error: Option<String>,
}

/// What one sample saw (filled by the sampler thread).
#[derive(Debug, Default)]
pub(super) struct Sample {
    /// Address → nodes holding it in their namespace.
    pub in_namespaces: BTreeMap<IpAddr, BTreeSet<String>>,
    /// Address → who answered ARP for it (only probed addresses present).
    pub on_wire: BTreeMap<IpAddr, BTreeSet<String>>,
    /// Nodes with `coordinator_state = primary`; `None` if etcd did not answer.
    pub primaries: Option<BTreeSet<String>>,
    /// The dnsmasq processes of the node namespaces.
    pub dnsmasq: Vec<DnsmasqProc>,
    /// Errors of this sample (other than etcd).
    pub errors: Vec<String>,
}

/// State shared by the sampler thread and the test.
#[derive(Debug)]
pub(super) struct State {
    pub started: Instant,
    pub samples: u64,
    pub total: Duration,
    pub max: Duration,
    pub etcd_failures: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    pub violations: Vec<Violation>,
    /// Ongoing episodes: (kind, subject) → index into `violations`.
    pub open: BTreeMap<(ViolationKind, String), usize>,
    pub holdings: BTreeMap<IpAddr, Holding>,
    pub primary: Holding,
    pub dnsmasq: Vec<DnsmasqProc>,
}

fn sorted(s: &BTreeSet<String>) -> Vec<String> {
    s.iter().cloned().collect()
}

impl State {
    fn new(at: Instant) -> State {
        State {
            started: at,
            samples: 0,
            total: Duration::ZERO,
            max: Duration::ZERO,
            etcd_failures: 0,
            errors: 0,
            last_error: None,
            violations: Vec::new(),
            open: BTreeMap::new(),
            holdings: BTreeMap::new(),
            primary: Holding::new(at),
            dnsmasq: Vec::new(),
        }
    }

    /// Fold sample `s`, taken at `at` in `took`, into the state.
    pub(super) fn apply(&mut self, s: Sample, at: Instant, took: Duration) {
        self.samples += 1;
        self.total += took;
        self.max = self.max.max(took);
        if !s.errors.is_empty() {
            self.errors += 1;
            self.last_error = s.errors.last().cloned();
        }
        let started = self.started;
        let mut now: Vec<(ViolationKind, String, Vec<String>)> = Vec::new();
        let addrs: BTreeSet<IpAddr> = s
            .in_namespaces
            .keys()
            .chain(s.on_wire.keys())
            .chain(self.holdings.keys())
            .copied()
            .collect();
        for addr in addrs {
            let h = self
                .holdings
                .entry(addr)
                .or_insert_with(|| Holding::new(started));
            let nodes = s.in_namespaces.get(&addr).map(sorted).unwrap_or_default();
            if nodes != h.nodes {
                h.nodes = nodes;
                h.since = at;
            }
            if h.nodes.len() > 1 {
                now.push((
                    ViolationKind::AddressInNamespaces,
                    addr.to_string(),
                    h.nodes.clone(),
                ));
            }
            let wire = s.on_wire.get(&addr).map(sorted).unwrap_or_default();
            if wire != h.wire {
                h.wire = wire;
                h.wire_since = at;
            }
            if h.wire.len() > 1 {
                now.push((
                    ViolationKind::AddressOnWire,
                    addr.to_string(),
                    h.wire.clone(),
                ));
            }
        }
        match &s.primaries {
            Some(p) => {
                let nodes = sorted(p);
                if nodes != self.primary.nodes {
                    self.primary.nodes = nodes;
                    self.primary.since = at;
                }
            }
            None => self.etcd_failures += 1,
        }
        if self.primary.nodes.len() > 1 {
            now.push((
                ViolationKind::Primary,
                "coordinator_state".into(),
                self.primary.nodes.clone(),
            ));
        }
        let mut per_net: BTreeMap<Option<u32>, Vec<String>> = BTreeMap::new();
        for d in &s.dnsmasq {
            per_net
                .entry(d.vni)
                .or_default()
                .push(format!("{} pid {}", d.node, d.pid));
        }
        for (vni, holders) in per_net {
            // A dnsmasq whose network cannot be told is not counted against any network.
            if let (Some(vni), true) = (vni, holders.len() > 1) {
                now.push((ViolationKind::Dnsmasq, format!("network {vni}"), holders));
            }
        }
        self.dnsmasq = s.dnsmasq;
        self.record(now, at);
    }

    /// Open, extend or close episodes after a sample at `at` that saw `now`.
    fn record(&mut self, now: Vec<(ViolationKind, String, Vec<String>)>, at: Instant) {
        let mut still = BTreeMap::new();
        for (kind, subject, mut holders) in now {
            holders.sort();
            let key = (kind, subject.clone());
            let idx = match self.open.get(&key) {
                Some(&i) if self.violations[i].holders == holders => {
                    let v = &mut self.violations[i];
                    v.last_seen = at;
                    v.samples += 1;
                    i
                }
                _ => {
                    self.violations.push(Violation {
                        kind,
                        subject,
                        holders,
                        first_seen: at,
                        last_seen: at,
                        samples: 1,
                    });
                    self.violations.len() - 1
                }
            };
            still.insert(key, idx);
        }
        self.open = still;
    }
}

/// Shared between the [`Checker`] handles and the sampler thread.
#[derive(Debug)]
pub(super) struct Inner {
    pub state: Mutex<State>,
    pub stop: AtomicBool,
    /// Addresses the test asked to watch besides the configured floating ones.
    pub watch: Mutex<BTreeSet<IpAddr>>,
    pub thread: Mutex<Option<JoinHandle<()>>>,
}

/// A handle on the cluster's invariant checker (cheap to clone; every clone sees the same
/// sampler). See the module documentation for what it checks.
#[derive(Debug, Clone)]
pub struct Checker {
    pub(super) inner: Arc<Inner>,
}

impl Checker {
    /// A checker whose sampler is not started yet.
    pub(super) fn new() -> Checker {
        Checker {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new(Instant::now())),
                stop: AtomicBool::new(false),
                watch: Mutex::new(BTreeSet::new()),
                thread: Mutex::new(None),
            }),
        }
    }

    /// Every violation episode so far, in the order they began.
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.inner.state).violations.clone()
    }

    /// Panic listing the violations, if there are any.
    #[track_caller]
    pub fn assert_clean(&self) {
        let v = self.violations();
        if !v.is_empty() {
            let started = lock(&self.inner.state).started;
            let lines: Vec<String> = v
                .iter()
                .map(|x| format!("  +{:?}: {x}", x.first_seen.duration_since(started)))
                .collect();
            panic!(
                "the cluster checker saw {} violation(s):\n{}",
                v.len(),
                lines.join("\n")
            );
        }
    }

    /// Forget the violations recorded so far (e.g. after one provoked on purpose); episodes
    /// still going on are recorded afresh from the next sample.
    pub fn clear_violations(&self) {
        let mut s = lock(&self.inner.state);
        s.violations.clear();
        s.open.clear();
    }

    /// Also watch `addr` (e.g. a managed network's gateway), in the namespaces and — if it is
    /// an IPv4 address of the cluster subnet — on the wire.
    pub fn watch(&self, addr: IpAddr) {
        lock(&self.inner.watch).insert(addr);
    }

    /// Who holds `addr` now and since when (empty holders if nobody has been seen with it).
    pub fn holder_of(&self, addr: IpAddr) -> Holding {
        let s = lock(&self.inner.state);
        s.holdings
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| Holding::new(s.started))
    }

    /// Nodes with `coordinator_state = primary` in etcd as last read, and since when.
    pub fn primary(&self) -> Holding {
        lock(&self.inner.state).primary.clone()
    }

    /// The dnsmasq processes of the node namespaces in the last sample.
    pub fn dnsmasq(&self) -> Vec<DnsmasqProc> {
        lock(&self.inner.state).dnsmasq.clone()
    }

    /// Wait until `node` alone holds `addr` in the namespaces; returns the sample instant at
    /// which that holding began ([`Holding::since`]: time a takeover from a fault's instant).
    pub fn wait_holder(&self, addr: IpAddr, node: &str, timeout: Duration) -> Result<Instant> {
        wait_until(&format!("{node} to hold {addr} alone"), timeout, || {
            let h = self.holder_of(addr);
            (h.sole() == Some(node)).then_some(h.since)
        })
    }

    /// Wait until `n` more samples have been taken (so a change made now has been seen).
    pub fn wait_samples(&self, n: u64, timeout: Duration) -> Result<()> {
        let target = lock(&self.inner.state).samples + n;
        wait_until(&format!("{n} more checker samples"), timeout, || {
            (lock(&self.inner.state).samples >= target).then_some(())
        })
    }

    /// Sampling cost and failures so far.
    pub fn stats(&self) -> CheckerStats {
        let s = lock(&self.inner.state);
        CheckerStats {
            samples: s.samples,
            mean: if s.samples == 0 {
                Duration::ZERO
            } else {
                s.total / u32::try_from(s.samples).unwrap_or(u32::MAX)
            },
            max: s.max,
            etcd_failures: s.etcd_failures,
            errors: s.errors,
            last_error: s.last_error.clone(),
        }
    }

    /// Stop the sampler and wait for its thread (idempotent; the cluster does it on drop,
    /// before deleting the namespaces the sampler has sockets in).
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        let t = lock(&self.inner.thread).take();
        if let Some(t) = t {
            if t.join().is_err() {
                eprintln!("debvisor-tests: the cluster checker thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(a: &[&str]) -> BTreeSet<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn episodes_open_extend_and_close() {
        let t0 = Instant::now();
        let mut st = State::new(t0);
        let fl: IpAddr = "192.0.2.100".parse().expect("ip");
        let at = |ms| t0 + Duration::from_millis(ms);
        let sample = |ns: &[&str], prim: &[&str]| Sample {
            in_namespaces: [(fl, set(ns))].into_iter().collect(),
            primaries: Some(set(prim)),
            ..Sample::default()
        };
        st.apply(sample(&["c1"], &["c1"]), at(10), Duration::from_millis(1));
        assert!(st.violations.is_empty());
        assert_eq!(st.holdings[&fl].sole(), Some("c1"));
        assert_eq!(st.holdings[&fl].since, at(10));
        st.apply(
            sample(&["c1", "c2"], &["c1"]),
            at(20),
            Duration::from_millis(1),
        );
        st.apply(
            sample(&["c1", "c2"], &["c1"]),
            at(30),
            Duration::from_millis(1),
        );
        assert_eq!(st.violations.len(), 1);
        let v = &st.violations[0];
        assert_eq!(v.kind, ViolationKind::AddressInNamespaces);
        assert_eq!(v.holders, vec!["c1", "c2"]);
        assert_eq!((v.first_seen, v.last_seen, v.samples), (at(20), at(30), 2));
        st.apply(
            sample(&["c2"], &["c1", "c2"]),
            at(40),
            Duration::from_millis(1),
        );
        assert_eq!(
            st.violations.len(),
            2,
            "address episode closed, primary one opened"
        );
        assert_eq!(st.violations[1].kind, ViolationKind::Primary);
        assert_eq!(st.holdings[&fl].since, at(40));
        // etcd away: the primary view keeps its last value, and the episode goes on.
        st.apply(
            Sample {
                in_namespaces: [(fl, set(&["c2"]))].into_iter().collect(),
                ..Sample::default()
            },
            at(50),
            Duration::from_millis(1),
        );
        assert_eq!(st.violations[1].samples, 2);
        assert_eq!(st.etcd_failures, 1);
        st.apply(sample(&[], &["c2"]), at(60), Duration::from_millis(3));
        assert_eq!(st.violations.len(), 2);
        assert!(st.open.is_empty());
        assert_eq!(st.holdings[&fl].nodes, Vec::<String>::new());
        assert_eq!(st.max, Duration::from_millis(3));
    }

    #[test]
    fn two_dnsmasq_for_one_network_is_a_violation_one_per_network_is_not() {
        let t0 = Instant::now();
        let mut st = State::new(t0);
        let d = |node: &str, pid, vni| DnsmasqProc {
            pid,
            node: node.into(),
            vni,
        };
        st.apply(
            Sample {
                dnsmasq: vec![
                    d("c1", 10, Some(100)),
                    d("c2", 11, Some(200)),
                    d("c3", 12, None),
                ],
                primaries: Some(BTreeSet::new()),
                ..Sample::default()
            },
            t0,
            Duration::ZERO,
        );
        assert!(st.violations.is_empty());
        st.apply(
            Sample {
                dnsmasq: vec![d("c1", 10, Some(100)), d("c2", 13, Some(100))],
                primaries: Some(BTreeSet::new()),
                ..Sample::default()
            },
            t0,
            Duration::ZERO,
        );
        assert_eq!(st.violations.len(), 1);
        assert_eq!(st.violations[0].subject, "network 100");
        assert_eq!(st.violations[0].holders, vec!["c1 pid 10", "c2 pid 13"]);
    }
}
