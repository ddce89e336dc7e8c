//! The removal guard: a VM deleted from etcd is destroyed and undefined here only on
//! evidence that someone meant it.
//!
//! - A removal first waits `settle`, so a burst of deletions (a prefix delete, a relist
//!   after which many objects are missing) is seen whole before anything is destroyed.
//! - If more than `percent` of this node's VMs (and at least `min` of them) vanish within
//!   `window`, the guard trips: nothing is destroyed, one error is logged, the node reports
//!   the held removals in its health, and it waits for an operator
//!   (`debvisorctl node confirm-removals NODE`) or for the keys to come back.
//! - While the store is found replaced (see `debvisor_objects::witness`), every removal is
//!   held the same way.
//!
//! Pure bookkeeping over an injected clock: the Domain host asks for a [`Verdict`] and acts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use debvisor_objects::node::HeldRemovals;

/// The guard's settings (`domains.removal_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardConfig {
    /// Percentage of this node's VMs whose removal in one window trips the guard.
    pub percent: u32,
    /// Fewest removals that can trip it.
    pub min: u32,
    /// Window in which removals count together.
    pub window: Duration,
    /// Wait before a removal is carried out.
    pub settle: Duration,
}

/// What to do with one removal now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Ask again after this long (the burst may not be complete yet).
    Wait(Duration),
    /// Carry it out.
    Proceed,
    /// Do not: held until an operator confirms or the VM's keys come back.
    Hold,
}

/// Why removals are held right now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Trip {
    reason: String,
    since: String,
}

/// The guard's memory of recent and held removals.
#[derive(Debug)]
pub struct RemovalGuard {
    cfg: GuardConfig,
    /// Removals seen and not yet decided: uuid → when first seen.
    pending: BTreeMap<String, Instant>,
    /// Removals seen within the window (decided or not), oldest first.
    recent: VecDeque<(Instant, String)>,
    /// Held removals: uuid → name.
    held: BTreeMap<String, String>,
    /// Confirmed by an operator: carried out without asking again.
    released: BTreeSet<String>,
    trip: Option<Trip>,
}

impl RemovalGuard {
    /// A guard with `cfg`.
    pub fn new(cfg: GuardConfig) -> RemovalGuard {
        RemovalGuard {
            cfg,
            pending: BTreeMap::new(),
            recent: VecDeque::new(),
            held: BTreeMap::new(),
            released: BTreeSet::new(),
            trip: None,
        }
    }

    /// Decide on the removal of VM `uuid` (`name` for reports), whose guest is on this host.
    /// `remaining` is how many of this node's VMs are still in etcd; `store_changed` the
    /// reason the store is suspect, if it is; `now_text` the RFC 3339 time for a new trip.
    pub fn judge(
        &mut self,
        uuid: &str,
        name: &str,
        remaining: usize,
        store_changed: Option<&str>,
        now: Instant,
        now_text: &str,
    ) -> Verdict {
        if self.released.remove(uuid) {
            self.pending.remove(uuid);
            return Verdict::Proceed;
        }
        if self.held.contains_key(uuid) {
            return Verdict::Hold;
        }
        if let Some(reason) = store_changed {
            self.trip_with(format!("store replaced: {reason}"), now_text);
            self.hold(uuid, name);
            return Verdict::Hold;
        }
        if self.trip.is_some() {
            self.hold(uuid, name);
            return Verdict::Hold;
        }
        let first = *self.pending.entry(uuid.to_string()).or_insert_with(|| {
            self.recent.push_back((now, uuid.to_string()));
            now
        });
        let waited = now.saturating_duration_since(first);
        if waited < self.cfg.settle {
            return Verdict::Wait(self.cfg.settle - waited);
        }
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.cfg.window)
        {
            self.recent.pop_front();
        }
        let gone: BTreeSet<&str> = self.recent.iter().map(|(_, u)| u.as_str()).collect();
        let gone = gone.len();
        let total = remaining + gone;
        let too_many = gone as u64 >= u64::from(self.cfg.min)
            && gone as u64 * 100 > u64::from(self.cfg.percent) * total as u64;
        if too_many {
            self.trip_with(
                format!(
                    "{gone} of this node's {total} VMs vanished from etcd within {}s (more than {}%)",
                    self.cfg.window.as_secs(),
                    self.cfg.percent
                ),
                now_text,
            );
            let waiting: Vec<String> = self.pending.keys().cloned().collect();
            for u in waiting {
                let n = if u == uuid {
                    name.to_string()
                } else {
                    u.clone()
                };
                self.hold(&u, &n);
            }
            self.hold(uuid, name);
            return Verdict::Hold;
        }
        self.pending.remove(uuid);
        Verdict::Proceed
    }

    fn trip_with(&mut self, reason: String, now_text: &str) {
        if self.trip.is_none() {
            self.trip = Some(Trip {
                reason,
                since: now_text.to_string(),
            });
        }
    }

    fn hold(&mut self, uuid: &str, name: &str) {
        self.pending.remove(uuid);
        self.held
            .entry(uuid.to_string())
            .or_insert_with(|| name.to_string());
    }

    /// Are removals held right now?
    pub fn is_tripped(&self) -> bool {
        self.trip.is_some()
    }

    /// Is the removal of `uuid` waiting or held (the guard speaks for that domain)?
    pub fn knows(&self, uuid: &str) -> bool {
        self.pending.contains_key(uuid) || self.held.contains_key(uuid)
    }

    /// The VM's keys came back: it is no longer a removal.
    pub fn forget(&mut self, uuid: &str) {
        self.pending.remove(uuid);
        self.held.remove(uuid);
        self.released.remove(uuid);
        self.recent.retain(|(_, u)| u != uuid);
        if self.held.is_empty() {
            self.trip = None;
        }
    }

    /// An operator confirmed: every held removal is carried out; returns their uuids.
    pub fn release(&mut self) -> Vec<String> {
        self.trip = None;
        self.recent.clear();
        let held = std::mem::take(&mut self.held);
        self.released.extend(held.keys().cloned());
        held.into_keys().collect()
    }

    /// What the node reports in its health while removals are held.
    pub fn report(&self) -> Option<HeldRemovals> {
        let trip = self.trip.as_ref()?;
        Some(HeldRemovals {
            count: self.held.len() as u32,
            reason: trip.reason.clone(),
            since: trip.since.clone(),
            names: self.held.values().take(20).cloned().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> RemovalGuard {
        RemovalGuard::new(GuardConfig {
            percent: 50,
            min: 3,
            window: Duration::from_secs(10),
            settle: Duration::from_secs(2),
        })
    }

    const T: &str = "2026-12-06T00:00:00Z";

    #[test]
    fn one_removal_waits_the_settle_time_then_proceeds() {
        let mut g = guard();
        let t0 = Instant::now();
        assert_eq!(
            g.judge("a", "va", 9, None, t0, T),
            Verdict::Wait(Duration::from_secs(2))
        );
        assert_eq!(
            g.judge("a", "va", 9, None, t0 + Duration::from_secs(1), T),
            Verdict::Wait(Duration::from_secs(1))
        );
        assert_eq!(
            g.judge("a", "va", 9, None, t0 + Duration::from_secs(2), T),
            Verdict::Proceed
        );
        assert_eq!(g.report(), None);
    }

    #[test]
    fn a_burst_over_the_share_trips_and_holds_every_waiting_removal() {
        let mut g = guard();
        let t0 = Instant::now();
        // 4 of 6 VMs vanish at once (a prefix delete, or a relist of an emptied store).
        for u in ["a", "b", "c", "d"] {
            assert!(matches!(g.judge(u, u, 2, None, t0, T), Verdict::Wait(_)));
        }
        let later = t0 + Duration::from_secs(2);
        assert_eq!(g.judge("a", "a", 2, None, later, T), Verdict::Hold);
        for u in ["b", "c", "d"] {
            assert_eq!(g.judge(u, u, 2, None, later, T), Verdict::Hold, "{u}");
        }
        let r = g.report().expect("held");
        assert_eq!(r.count, 4);
        assert!(r.reason.contains("4 of this node's 6 VMs"), "{}", r.reason);
        // Later removals are held too, until an operator confirms.
        assert_eq!(
            g.judge("e", "e", 1, None, later + Duration::from_secs(60), T),
            Verdict::Hold
        );
        let mut released = g.release();
        released.sort();
        assert_eq!(released, ["a", "b", "c", "d", "e"]);
        assert_eq!(g.report(), None);
        assert_eq!(g.judge("c", "c", 1, None, later, T), Verdict::Proceed);
    }

    #[test]
    fn a_few_removals_on_a_small_node_are_not_a_mass_removal() {
        let mut g = guard();
        let t0 = Instant::now();
        // 2 of 2 VMs: 100 %, but fewer than removal_hold_min.
        for u in ["a", "b"] {
            g.judge(u, u, 0, None, t0, T);
        }
        let later = t0 + Duration::from_secs(3);
        assert_eq!(g.judge("a", "a", 0, None, later, T), Verdict::Proceed);
        assert_eq!(g.judge("b", "b", 0, None, later, T), Verdict::Proceed);
    }

    #[test]
    fn removals_spread_over_more_than_the_window_do_not_add_up() {
        let mut g = guard();
        let mut t = Instant::now();
        for (i, u) in ["a", "b", "c", "d"].iter().enumerate() {
            g.judge(u, u, 4 - i, None, t, T);
            t += Duration::from_secs(3);
            assert_eq!(g.judge(u, u, 4 - i, None, t, T), Verdict::Proceed, "{u}");
            t += Duration::from_secs(9);
        }
    }

    #[test]
    fn a_replaced_store_holds_every_removal_and_keys_that_come_back_are_forgotten() {
        let mut g = guard();
        let t0 = Instant::now();
        let why = Some("etcd revision went back from 900 to 4");
        assert_eq!(g.judge("a", "va", 5, why, t0, T), Verdict::Hold);
        assert!(g.report().expect("held").reason.contains("store replaced"));
        g.forget("a");
        assert_eq!(g.report(), None, "nothing held once the keys are back");
    }
}
