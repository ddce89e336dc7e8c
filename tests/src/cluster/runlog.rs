//! The run log: what the run recorder saw of the VMs on each node, and from it the intervals
//! during which each VM ran where. Pure (observations in, intervals out), so the interval
//! logic is unit-tested without libvirt.
//!
//! A VM *runs* on a node while its vCPUs may execute there: from a start or resume to a
//! pause, stop or the node's death. A paused domain does not run: the destination of a live
//! migration starts paused (`started migrated`) and runs from `resumed migrated`, after the
//! source paused, so a migration is not a double run.
//!
//! Three kinds of observation, each stamped with the instant it was made:
//! - a lifecycle event of one VM on one node (exact; events from different nodes, or a
//!   late one, may be pushed out of order: intervals are computed from the stamps);
//! - a domain list of one node (the safety net for lost events, e.g. while the recorder's
//!   event connection was down): it only says something about a VM when no event of that
//!   VM on that node is stamped from the list's request to [`LIST_EVENT_GRACE`] after its
//!   reply (else the list may predate what the event says); a VM it shows running that
//!   the log thinks stopped starts running at the request, one it does not show stops at
//!   the reply;
//! - the death of a node (power off): every VM it ran stops then, with no event.
//!
//! Two intervals of one VM on two nodes overlap when each starts before the other ends;
//! intervals that only touch (one ends at the instant the other starts) do not, and
//! zero-length intervals are dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

/// How long after a list's reply an event of a VM still makes that list's view of the VM
/// stale (events are delivered a little after they happen).
pub const LIST_EVENT_GRACE: Duration = Duration::from_millis(500);

/// What an interval boundary rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// A libvirt lifecycle event (e.g. `started booted`, `stopped destroyed`).
    Event(String),
    /// The periodic domain list (the events said nothing).
    List,
    /// The node went down (powered off by its BMC): its guests were dead by then.
    NodeDown,
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Evidence::Event(e) => write!(f, "event `{e}`"),
            Evidence::List => f.write_str("domain list"),
            Evidence::NodeDown => f.write_str("node down"),
        }
    }
}

/// One stretch of time during which a VM ran on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInterval {
    /// The node.
    pub node: String,
    /// When it began running there.
    pub start: Instant,
    /// When it stopped running there; `None` while it still runs.
    pub end: Option<Instant>,
    /// What showed the start.
    pub started_by: Evidence,
    /// What showed the end (`None` while it still runs).
    pub ended_by: Option<Evidence>,
}

impl RunInterval {
    /// The time both intervals cover (`(from, until)`, `until` `None`: open), if any.
    pub fn overlap(&self, other: &RunInterval) -> Option<(Instant, Option<Instant>)> {
        let from = self.start.max(other.start);
        let until = match (self.end, other.end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (Some(a), None) | (None, Some(a)) => Some(a),
            (None, None) => None,
        };
        match until {
            Some(u) if u <= from => None,
            _ => Some((from, until)),
        }
    }
}

/// One VM running on two nodes at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoubleRun {
    /// The VM's UUID.
    pub uuid: String,
    /// The interval that began first (on one node).
    pub first: RunInterval,
    /// The other interval (on another node).
    pub second: RunInterval,
    /// When both ran.
    pub from: Instant,
    /// Until when (`None`: both still run).
    pub until: Option<Instant>,
}

impl fmt::Display for DoubleRun {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let side = |i: &RunInterval| {
            let lead = self.from.saturating_duration_since(i.start);
            let end = match (&i.end, &i.ended_by) {
                (Some(e), Some(by)) => format!(
                    "until {:?} after the overlap began ({by})",
                    e.saturating_duration_since(self.from)
                ),
                _ => "still running".to_owned(),
            };
            format!(
                "on {} since {lead:?} before the overlap ({}), {end}",
                i.node, i.started_by
            )
        };
        let length = match self.until {
            Some(u) => format!("for {:?}", u.saturating_duration_since(self.from)),
            None => "and still does".to_owned(),
        };
        write!(
            f,
            "VM {} ran on {} and {} at once {length}: {}; {}",
            self.uuid,
            self.first.node,
            self.second.node,
            side(&self.first),
            side(&self.second)
        )
    }
}

/// Every double run found by a check ([`RunLog::check`]): an error that lists them, one a
/// line (also as `Debug`, so `.expect()` prints them readably).
#[derive(Clone, PartialEq, Eq)]
pub struct DoubleRuns(pub Vec<DoubleRun>);

impl fmt::Display for DoubleRuns {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} double runs:", self.0.len())?;
        for d in &self.0 {
            write!(f, "\n  {d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DoubleRuns {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for DoubleRuns {}

/// What one observation saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A lifecycle event of VM `uuid`: it runs from now on (`running`) or not; `what`
    /// describes the event.
    Event {
        /// The VM.
        uuid: String,
        /// Whether it runs after this event.
        running: bool,
        /// The event (`started booted`, `suspended migrated`, …).
        what: String,
    },
    /// A domain list of the node: the VMs it showed running. The request went out at
    /// `sent`; the observation's instant is the reply.
    List {
        /// When the request went out.
        sent: Instant,
        /// UUIDs of the VMs running.
        running: BTreeSet<String>,
    },
    /// The node went down: none of its VMs runs from then on.
    Down,
}

/// One observation of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// When it was made (a list: its reply).
    pub at: Instant,
    /// The node it is about.
    pub node: String,
    /// What it saw.
    pub seen: Seen,
}

/// A boundary claim on one VM on one node, derived from an observation.
#[derive(Debug, Clone)]
struct Claim {
    at: Instant,
    running: bool,
    by: Evidence,
}

/// Every observation so far; intervals are computed on demand.
#[derive(Debug, Clone, Default)]
pub struct RunLog {
    obs: Vec<Observation>,
}

impl RunLog {
    /// An empty log.
    pub fn new() -> RunLog {
        RunLog::default()
    }

    /// Record `o` (in any order: intervals follow the instants, ties the push order).
    pub fn push(&mut self, o: Observation) {
        self.obs.push(o);
    }

    /// How many observations were recorded.
    pub fn len(&self) -> usize {
        self.obs.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.obs.is_empty()
    }

    /// Every VM the log has seen, by UUID.
    pub fn uuids(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for o in &self.obs {
            match &o.seen {
                Seen::Event { uuid, .. } => {
                    out.insert(uuid.clone());
                }
                Seen::List { running, .. } => out.extend(running.iter().cloned()),
                Seen::Down => {}
            }
        }
        out
    }

    /// The boundary claims on `uuid` on `node`, sorted by instant (ties in push order).
    fn claims(&self, uuid: &str, node: &str) -> Vec<Claim> {
        let events: Vec<Instant> = self
            .obs
            .iter()
            .filter(|o| o.node == node)
            .filter(|o| matches!(&o.seen, Seen::Event { uuid: u, .. } if u == uuid))
            .map(|o| o.at)
            .collect();
        let mut claims = Vec::new();
        for o in self.obs.iter().filter(|o| o.node == node) {
            match &o.seen {
                Seen::Event {
                    uuid: u,
                    running,
                    what,
                } if u == uuid => claims.push(Claim {
                    at: o.at,
                    running: *running,
                    by: Evidence::Event(what.clone()),
                }),
                Seen::Event { .. } => {}
                Seen::List { sent, running } => {
                    let stale_until = o.at + LIST_EVENT_GRACE;
                    if events.iter().any(|e| *e >= *sent && *e <= stale_until) {
                        continue;
                    }
                    let runs = running.contains(uuid);
                    claims.push(Claim {
                        at: if runs { *sent } else { o.at },
                        running: runs,
                        by: Evidence::List,
                    });
                }
                Seen::Down => claims.push(Claim {
                    at: o.at,
                    running: false,
                    by: Evidence::NodeDown,
                }),
            }
        }
        claims.sort_by_key(|c| c.at);
        claims
    }

    /// The intervals of `uuid` on `node`, in time order.
    fn node_intervals(&self, uuid: &str, node: &str) -> Vec<RunInterval> {
        let mut out = Vec::new();
        let mut open: Option<(Instant, Evidence)> = None;
        for c in self.claims(uuid, node) {
            match (c.running, open.take()) {
                (true, None) => open = Some((c.at, c.by)),
                (true, Some(o)) => open = Some(o),
                (false, Some((start, started_by))) => {
                    if c.at > start {
                        out.push(RunInterval {
                            node: node.to_owned(),
                            start,
                            end: Some(c.at),
                            started_by,
                            ended_by: Some(c.by),
                        });
                    }
                }
                (false, None) => {}
            }
        }
        if let Some((start, started_by)) = open {
            out.push(RunInterval {
                node: node.to_owned(),
                start,
                end: None,
                started_by,
                ended_by: None,
            });
        }
        out
    }

    /// The nodes the log has observations of.
    fn nodes(&self) -> BTreeSet<&str> {
        self.obs.iter().map(|o| o.node.as_str()).collect()
    }

    /// Every interval of `uuid` on every node, sorted by start (then node).
    pub fn intervals(&self, uuid: &str) -> Vec<RunInterval> {
        let mut out: Vec<RunInterval> = self
            .nodes()
            .into_iter()
            .flat_map(|n| self.node_intervals(uuid, n))
            .collect();
        out.sort_by(|a, b| a.start.cmp(&b.start).then_with(|| a.node.cmp(&b.node)));
        out
    }

    /// Every interval of every VM, by UUID.
    pub fn all_intervals(&self) -> BTreeMap<String, Vec<RunInterval>> {
        self.uuids()
            .into_iter()
            .map(|u| {
                let i = self.intervals(&u);
                (u, i)
            })
            .collect()
    }

    /// Every moment a VM ran on two nodes at once: one entry per overlapping pair of
    /// intervals on different nodes, by UUID then time.
    pub fn overlaps(&self) -> Vec<DoubleRun> {
        let mut out = Vec::new();
        for (uuid, intervals) in self.all_intervals() {
            for (i, a) in intervals.iter().enumerate() {
                for b in &intervals[i + 1..] {
                    if a.node == b.node {
                        continue;
                    }
                    if let Some((from, until)) = a.overlap(b) {
                        out.push(DoubleRun {
                            uuid: uuid.clone(),
                            first: a.clone(),
                            second: b.clone(),
                            from,
                            until,
                        });
                    }
                }
            }
        }
        out
    }

    /// The invariant: no VM ever ran on two nodes at once. `Err` lists every overlap
    /// ([`RunLog::overlaps`]).
    pub fn check(&self) -> Result<(), DoubleRuns> {
        let o = self.overlaps();
        if o.is_empty() {
            Ok(())
        } else {
            Err(DoubleRuns(o))
        }
    }

    /// The nodes on which `uuid` runs now (an open interval), sorted.
    pub fn running_on(&self, uuid: &str) -> Vec<String> {
        let mut nodes: Vec<String> = self
            .intervals(uuid)
            .into_iter()
            .filter(|i| i.end.is_none())
            .map(|i| i.node)
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Instants `ms` milliseconds after a common base.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Clock {
            Clock(Instant::now())
        }
        fn t(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    const VM: &str = "11111111-2222-3333-4444-555555555555";

    fn event(at: Instant, node: &str, running: bool) -> Observation {
        Observation {
            at,
            node: node.to_owned(),
            seen: Seen::Event {
                uuid: VM.to_owned(),
                running,
                what: if running {
                    "started booted"
                } else {
                    "stopped destroyed"
                }
                .to_owned(),
            },
        }
    }

    fn list(sent: Instant, at: Instant, node: &str, running: &[&str]) -> Observation {
        Observation {
            at,
            node: node.to_owned(),
            seen: Seen::List {
                sent,
                running: running.iter().map(|s| s.to_string()).collect(),
            },
        }
    }

    fn down(at: Instant, node: &str) -> Observation {
        Observation {
            at,
            node: node.to_owned(),
            seen: Seen::Down,
        }
    }

    fn log(obs: Vec<Observation>) -> RunLog {
        let mut l = RunLog::new();
        for o in obs {
            l.push(o);
        }
        l
    }

    fn spans(l: &RunLog, c: &Clock) -> Vec<(String, u64, Option<u64>)> {
        let ms = |i: Instant| i.duration_since(c.0).as_millis() as u64;
        l.intervals(VM)
            .into_iter()
            .map(|i| (i.node, ms(i.start), i.end.map(ms)))
            .collect()
    }

    fn span(node: &str, s: u64, e: Option<u64>) -> (String, u64, Option<u64>) {
        (node.to_owned(), s, e)
    }

    #[test]
    fn a_start_and_a_stop_make_one_interval() {
        let c = Clock::new();
        let l = log(vec![
            event(c.t(10), "c1", true),
            event(c.t(20), "c1", false),
        ]);
        assert_eq!(spans(&l, &c), [span("c1", 10, Some(20))]);
        let i = &l.intervals(VM)[0];
        assert_eq!(i.started_by, Evidence::Event("started booted".into()));
        assert_eq!(
            i.ended_by,
            Some(Evidence::Event("stopped destroyed".into()))
        );
        assert!(l.overlaps().is_empty());
        assert_eq!(l.check(), Ok(()));
        assert!(l.running_on(VM).is_empty());
    }

    #[test]
    fn repeated_starts_and_stops_without_a_start_change_nothing() {
        let c = Clock::new();
        let l = log(vec![
            event(c.t(5), "c1", false),
            event(c.t(10), "c1", true),
            event(c.t(15), "c1", true),
            event(c.t(20), "c1", false),
            event(c.t(25), "c1", false),
        ]);
        assert_eq!(spans(&l, &c), [span("c1", 10, Some(20))]);
    }

    #[test]
    fn an_open_interval_runs_on() {
        let c = Clock::new();
        let l = log(vec![event(c.t(10), "c1", true)]);
        assert_eq!(spans(&l, &c), [span("c1", 10, None)]);
        assert_eq!(l.running_on(VM), ["c1"]);
    }

    #[test]
    fn a_handover_in_sequence_or_touching_is_not_a_double_run() {
        let c = Clock::new();
        let l = log(vec![
            event(c.t(10), "c1", true),
            event(c.t(20), "c1", false),
            event(c.t(25), "c2", true),
        ]);
        assert!(l.overlaps().is_empty());
        assert_eq!(l.running_on(VM), ["c2"]);
        let touching = log(vec![
            event(c.t(10), "c1", true),
            event(c.t(20), "c1", false),
            event(c.t(20), "c2", true),
        ]);
        assert!(touching.overlaps().is_empty(), "{:?}", touching.overlaps());
    }

    #[test]
    fn overlapping_intervals_name_both_nodes_and_the_overlap() {
        let c = Clock::new();
        let l = log(vec![
            event(c.t(10), "c1", true),
            event(c.t(15), "c2", true),
            event(c.t(30), "c1", false),
        ]);
        let o = l.overlaps();
        assert_eq!(o.len(), 1, "{o:?}");
        assert_eq!(
            (o[0].first.node.as_str(), o[0].second.node.as_str()),
            ("c1", "c2")
        );
        assert_eq!((o[0].from, o[0].until), (c.t(15), Some(c.t(30))));
        let text = o[0].to_string();
        assert!(
            text.contains("c1") && text.contains("c2") && text.contains(VM),
            "{text}"
        );
        let err = l.check().expect_err("a double run fails the check");
        assert_eq!(err.0, o);
        let listed = format!("{err:?}");
        assert!(listed.starts_with("1 double runs:\n  VM "), "{listed}");
        // Both still running: the overlap is open.
        let open = log(vec![event(c.t(10), "c1", true), event(c.t(15), "c2", true)]);
        let o = open.overlaps();
        assert_eq!((o[0].from, o[0].until), (c.t(15), None));
        assert_eq!(open.running_on(VM), ["c1", "c2"]);
    }

    #[test]
    fn a_node_that_dies_stops_its_guests_at_its_death() {
        let c = Clock::new();
        let after = log(vec![
            event(c.t(10), "c1", true),
            down(c.t(20), "c1"),
            event(c.t(21), "c2", true),
        ]);
        assert_eq!(
            spans(&after, &c),
            [span("c1", 10, Some(20)), span("c2", 21, None)]
        );
        assert_eq!(after.intervals(VM)[0].ended_by, Some(Evidence::NodeDown));
        assert!(after.overlaps().is_empty());
        // Recovered elsewhere before the node was really dead: caught.
        let before = log(vec![
            event(c.t(10), "c1", true),
            event(c.t(18), "c2", true),
            down(c.t(20), "c1"),
        ]);
        let o = before.overlaps();
        assert_eq!(o.len(), 1);
        assert_eq!((o[0].from, o[0].until), (c.t(18), Some(c.t(20))));
        // A death with nothing running, and a restart on the same node afterwards.
        let again = log(vec![
            down(c.t(5), "c1"),
            event(c.t(10), "c1", true),
            down(c.t(20), "c1"),
            event(c.t(30), "c1", true),
        ]);
        assert_eq!(
            spans(&again, &c),
            [span("c1", 10, Some(20)), span("c1", 30, None)]
        );
    }

    #[test]
    fn events_pushed_out_of_order_give_the_same_intervals() {
        let c = Clock::new();
        let ordered = vec![
            event(c.t(10), "c1", true),
            event(c.t(15), "c2", true),
            event(c.t(20), "c1", false),
            down(c.t(40), "c2"),
            event(c.t(50), "c1", true),
        ];
        let want = log(ordered.clone());
        let mut reversed = ordered.clone();
        reversed.reverse();
        let mut rotated = ordered;
        rotated.rotate_left(2);
        for obs in [reversed, rotated] {
            let l = log(obs);
            assert_eq!(spans(&l, &c), spans(&want, &c));
            assert_eq!(l.overlaps(), want.overlaps());
        }
    }

    #[test]
    fn a_live_migration_pauses_the_source_before_the_destination_resumes() {
        let c = Clock::new();
        let ev = |at, node: &str, running, what: &str| Observation {
            at,
            node: node.to_owned(),
            seen: Seen::Event {
                uuid: VM.to_owned(),
                running,
                what: what.to_owned(),
            },
        };
        let l = log(vec![
            ev(c.t(0), "c1", true, "started booted"),
            ev(c.t(100), "c2", false, "started migrated"),
            ev(c.t(500), "c1", false, "suspended migrated"),
            ev(c.t(520), "c2", true, "resumed migrated"),
            ev(c.t(530), "c1", false, "stopped migrated"),
        ]);
        assert!(l.overlaps().is_empty(), "{:?}", l.overlaps());
        assert_eq!(
            spans(&l, &c),
            [span("c1", 0, Some(500)), span("c2", 520, None)]
        );
    }

    #[test]
    fn lists_fill_in_missed_starts_and_stops() {
        let c = Clock::new();
        // No event at all: running from the first list's request to the first reply
        // without it.
        let l = log(vec![
            list(c.t(0), c.t(5), "c1", &[]),
            list(c.t(1000), c.t(1005), "c1", &[VM]),
            list(c.t(2000), c.t(2005), "c1", &[VM]),
            list(c.t(3000), c.t(3005), "c1", &[]),
        ]);
        assert_eq!(spans(&l, &c), [span("c1", 1000, Some(3005))]);
        assert_eq!(l.intervals(VM)[0].started_by, Evidence::List);
        assert_eq!(l.intervals(VM)[0].ended_by, Some(Evidence::List));
        // A start event, the stop missed (the event connection was down): the list ends it.
        let l = log(vec![
            event(c.t(10), "c1", true),
            list(c.t(2000), c.t(2005), "c1", &[]),
        ]);
        assert_eq!(spans(&l, &c), [span("c1", 10, Some(2005))]);
    }

    #[test]
    fn a_list_overtaken_by_an_event_is_ignored_for_that_vm() {
        let c = Clock::new();
        // The list was asked before the stop and answered "running" after it.
        let l = log(vec![
            event(c.t(10), "c1", true),
            event(c.t(1002), "c1", false),
            list(c.t(1000), c.t(1005), "c1", &[VM]),
        ]);
        assert_eq!(spans(&l, &c), [span("c1", 10, Some(1002))]);
        // An event delivered shortly after the reply also makes the list stale…
        let l = log(vec![
            list(c.t(1000), c.t(1005), "c1", &[]),
            event(c.t(1200), "c1", true),
        ]);
        assert_eq!(spans(&l, &c), [span("c1", 1200, None)]);
        // …but a list well before or after an event counts.
        let l = log(vec![
            event(c.t(10), "c1", true),
            list(c.t(3000), c.t(3005), "c1", &[]),
        ]);
        assert_eq!(spans(&l, &c), [span("c1", 10, Some(3005))]);
        // A list about other VMs says this one does not run.
        let l = log(vec![
            event(c.t(10), "c1", true),
            list(c.t(3000), c.t(3005), "c1", &["other"]),
        ]);
        assert_eq!(spans(&l, &c), [span("c1", 10, Some(3005))]);
    }

    #[test]
    fn a_list_caught_double_run_names_both_nodes() {
        let c = Clock::new();
        let l = log(vec![
            event(c.t(10), "c1", true),
            list(c.t(1000), c.t(1004), "c2", &[VM]),
        ]);
        let o = l.overlaps();
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].second.node, "c2");
        assert_eq!(o[0].second.started_by, Evidence::List);
    }

    /// Brute force: whether `node` runs just after instant `x` ms (half-steps between the
    /// integer instants events sit on), from its events sorted stably by time.
    fn runs_at(events: &[(u64, bool)], x2: u64) -> bool {
        let mut sorted = events.to_vec();
        sorted.sort_by_key(|e| e.0);
        sorted
            .iter()
            .rfind(|(t, _)| t * 2 < x2)
            .is_some_and(|(_, r)| *r)
    }

    /// The instants between the integer ones, in half milliseconds (0.5, 1.5, 2.5, 3.5 ms).
    const HALF_STEPS: [u64; 4] = [1, 3, 5, 7];

    /// Every sequence of up to three start/stop events per node on two nodes, at instants
    /// 0, 1 and 2 ms (ties included), with either node's events pushed first: the log finds
    /// a double run exactly when
    /// some half-step has the VM running on both, and its overlaps cover exactly those.
    #[test]
    fn exhaustively_a_double_run_is_found_exactly_when_both_run() {
        let c = Clock::new();
        let steps: Vec<(u64, bool)> = (0..3).flat_map(|t| [(t, true), (t, false)]).collect();
        let mut seqs: Vec<Vec<(u64, bool)>> = vec![Vec::new()];
        for len in 1..=3 {
            let mut more = Vec::new();
            for s in seqs.iter().filter(|s| s.len() == len - 1) {
                for st in &steps {
                    let mut n = s.clone();
                    n.push(*st);
                    more.push(n);
                }
            }
            seqs.extend(more);
        }
        let obs = |node: &str, s: &[(u64, bool)]| -> Vec<Observation> {
            s.iter().map(|(t, r)| event(c.t(*t), node, *r)).collect()
        };
        let mut checked = 0;
        for a in &seqs {
            for b in &seqs {
                let both: Vec<u64> = HALF_STEPS
                    .into_iter()
                    .filter(|x2| runs_at(a, *x2) && runs_at(b, *x2))
                    .collect();
                for a_first in [true, false] {
                    let (oa, ob) = (obs("c1", a), obs("c2", b));
                    let l = log(if a_first {
                        oa.into_iter().chain(ob).collect()
                    } else {
                        ob.into_iter().chain(oa).collect()
                    });
                    let overlaps = l.overlaps();
                    let found: Vec<u64> = HALF_STEPS
                        .into_iter()
                        .filter(|x2| {
                            let x = c.0 + Duration::from_micros(x2 * 500);
                            overlaps
                                .iter()
                                .any(|o| o.from < x && o.until.is_none_or(|u| x < u))
                        })
                        .collect();
                    assert_eq!(found, both, "c1 {a:?} c2 {b:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2 * 259 * 259);
    }
}
