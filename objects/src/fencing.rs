//! The primary's decisions about dead nodes, as a pure state machine over (cluster view,
//! clock, events) — no I/O, so every decision is tested by a deterministic simulator:
//!
//! - **dead or not**: a node whose `alive` key is gone and whose `daemon_state` is not
//!   `stop` (a clean stop is no death) is suspect; after `grace` (≥ the self-fence margin +
//!   the time to destroy guests) it is declared `dead`. A node alive again before it is
//!   fenced is cleared.
//! - **fence or wait**: a dead node is fenced over IPMI unless the partition guard holds (at
//!   least half of the nodes look dead at once: a partition, not many failures), or the
//!   caps do (`max_concurrent` fences at once, `max_per_window` per `window`). Every skip is
//!   a decision with its reason, so the executor logs it once and reports it.
//! - **recover or not**: after a confirmed fence, with `successful_fence: migrate`; after a
//!   failed one only with `failed_fence: migrate` and self-fence on (the self-fence bound
//!   guarantees the node's guests stopped before its lease expired). The node is marked
//!   `fenced` in both cases and stays out until an operator readmits it. The bound does not
//!   hold for a node that went down in the middle of a clean stop (`daemon_state =
//!   shutdown`, its `stop` never recorded): a clean stop leaves its guests running on
//!   purpose, so such a node is recovered only after a confirmed fence. Its `shutdown`
//!   record is kept (never overwritten by `dead`) so that any later primary knows it too.
//! - **recover when**: while a fenced node is down; recovery pauses while it is alive (its
//!   lease outlives a power off by up to a TTL, or it booted and stays out) and resumes if
//!   it goes down again.
//!
//! What to recover where is [`crate::recovery`]; when a node may start a guest is the
//! Domain planner's lease check.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::node::DaemonState;

/// What happens to a dead node's VMs after a fence (the `fencing:` config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFence {
    /// Recover them on healthy nodes.
    Migrate,
    /// Leave them: an operator decides.
    None,
}

/// The primary's fencing policy.
#[derive(Debug, Clone, PartialEq)]
pub struct FencingPolicy {
    /// Fence dead nodes over IPMI at all.
    pub enabled: bool,
    /// Wait after `alive` vanished before declaring a node dead.
    pub grace: Duration,
    /// Fences in flight at once.
    pub max_concurrent: usize,
    /// Window of the fence cap.
    pub window: Duration,
    /// Fences started per window.
    pub max_per_window: usize,
    /// After a confirmed fence.
    pub successful_fence: AfterFence,
    /// After a failed fence (or no BMC, or fencing disabled).
    pub failed_fence: AfterFence,
    /// Nodes self-fence their guests before their lease expires.
    pub self_fence: bool,
}

/// One node as the primary sees it in a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// Node name.
    pub name: String,
    /// Its `alive` key exists (its lease is live).
    pub alive: bool,
    /// Its `daemon_state`.
    pub daemon_state: Option<DaemonState>,
    /// It publishes a BMC to fence it with.
    pub bmc: bool,
}

/// How a node came to be `fenced`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencedBy {
    /// IPMI power off, confirmed Off.
    Ipmi,
    /// The fence failed, but self-fence bounds its guests (`failed_fence: migrate`).
    SelfFence,
    /// Found `fenced` in etcd (an earlier primary).
    Record,
}

/// What the executor does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write `daemon_state = dead` (guarded: `alive` absent, `daemon_state` not `stop`).
    /// Not issued for a node whose record is `shutdown` (a clean stop that never recorded
    /// `stop`): that record stays, it tells every primary the self-fence bound does not
    /// hold for the node; the node is fenced all the same.
    DeclareDead { node: String },
    /// Power the node off over IPMI and confirm Off; report with [`FenceBook::fence_done`].
    Fence { node: String },
    /// Not fencing now, for `reason` (partition guard, caps, no BMC …); re-evaluated each
    /// tick, reported once per distinct reason.
    Skip { node: String, reason: String },
    /// Write `daemon_state = fenced` (the node stays out until readmitted). Issued again
    /// each tick while the node is still down and etcd does not show `fenced` (the write
    /// failed): recovery is guarded on that record.
    MarkFenced { node: String, by: FencedBy },
    /// The fence failed and the policy recovers nothing (or the self-fence bound does not
    /// hold: the node went down in a clean stop): an operator decides.
    FenceFailed { node: String, reason: String },
    /// Recover the node's VMs (see [`crate::recovery`]); idempotent, repeated each tick
    /// while the node is fenced, down and VMs remain.
    Recover { node: String },
    /// The node is alive again (or stopped cleanly) before it was fenced: forget it.
    Cleared { node: String },
}

/// Where one node stands. `stopping`: the node was seen down with `daemon_state =
/// shutdown` — a clean stop that never recorded `stop`, which leaves guests running, so
/// the self-fence bound does not cover it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// `alive` gone since then; the grace runs.
    Suspect { since: Instant, stopping: bool },
    /// Declared dead; waiting for a fence slot (the reason of the last skip).
    Dead {
        skipped: Option<String>,
        stopping: bool,
    },
    /// IPMI fence in flight.
    Fencing { stopping: bool },
    /// Fenced (daemon_state = fenced); recovery per policy while the node is down (paused
    /// while it is alive).
    Fenced { recover: bool, by: FencedBy },
    /// Fence failed, nothing recovered (policy `none`, or the node went down stopping).
    Failed,
}

/// The primary's memory of dead nodes and fences.
#[derive(Debug, Clone)]
pub struct FenceBook {
    policy: FencingPolicy,
    phases: BTreeMap<String, Phase>,
    /// Start times of recent fences (window cap).
    started: VecDeque<Instant>,
}

impl FenceBook {
    /// A book under `policy`.
    pub fn new(policy: FencingPolicy) -> FenceBook {
        FenceBook {
            policy,
            phases: BTreeMap::new(),
            started: VecDeque::new(),
        }
    }

    /// Fences in flight.
    pub fn in_flight(&self) -> usize {
        self.phases
            .values()
            .filter(|p| matches!(p, Phase::Fencing { .. }))
            .count()
    }

    /// The nodes being fenced now.
    pub fn fencing(&self) -> Vec<String> {
        self.phases
            .iter()
            .filter(|(_, p)| matches!(p, Phase::Fencing { .. }))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// This node lost the primary role: a successor continues from etcd (dead/fenced
    /// states); fences in flight here still report, but are not counted.
    pub fn reset(&mut self) {
        self.phases.clear();
        self.started.clear();
    }

    /// One look at the cluster at `now`.
    pub fn tick(&mut self, now: Instant, nodes: &[NodeFacts]) -> Vec<Decision> {
        let mut out = Vec::new();
        let known: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        self.phases.retain(|n, _| known.contains(&n.as_str()));
        for n in nodes {
            self.observe(now, n, &mut out);
        }
        self.fence_slots(now, nodes, &mut out);
        for (node, phase) in &self.phases {
            // Recovery is guarded on `alive` absent: while the fenced node is alive (a lease
            // that outlives the power off, or the node booted and stays out) it waits.
            let down = nodes.iter().any(|n| n.name == *node && !n.alive);
            if down && matches!(phase, Phase::Fenced { recover: true, .. }) {
                out.push(Decision::Recover { node: node.clone() });
            }
        }
        out
    }

    fn observe(&mut self, now: Instant, n: &NodeFacts, out: &mut Vec<Decision>) {
        let phase = self.phases.get(&n.name).cloned();
        // Fenced in etcd (by us or an earlier primary): out until readmitted.
        if n.daemon_state == Some(DaemonState::Fenced) {
            // While it is alive (back, still fenced) nothing is asked of it; should it go
            // down again, what is left of its VMs is recovered then (see `tick`).
            if !matches!(phase, Some(Phase::Fenced { .. }) | Some(Phase::Failed)) {
                let recover = self.recovers(FencedBy::Record, false);
                self.phases.insert(
                    n.name.clone(),
                    Phase::Fenced {
                        recover,
                        by: FencedBy::Record,
                    },
                );
            }
            return;
        }
        let down = !n.alive && n.daemon_state != Some(DaemonState::Stop);
        // Gone in the middle of a clean stop: its guests may be left running.
        let stopping_now = down && n.daemon_state == Some(DaemonState::Shutdown);
        match (down, phase) {
            (false, Some(Phase::Fencing { .. })) => {} // the fence decides; it is on its way
            (false, Some(Phase::Fenced { .. })) | (false, Some(Phase::Failed)) => {
                // Readmitted (daemon_state no longer fenced) or stopped cleanly.
                self.phases.remove(&n.name);
            }
            (false, Some(_)) => {
                self.phases.remove(&n.name);
                out.push(Decision::Cleared {
                    node: n.name.clone(),
                });
            }
            (false, None) => {}
            (true, None) => {
                if n.daemon_state == Some(DaemonState::Dead) {
                    // Declared by an earlier primary.
                    self.phases.insert(
                        n.name.clone(),
                        Phase::Dead {
                            skipped: None,
                            stopping: false,
                        },
                    );
                } else {
                    self.phases.insert(
                        n.name.clone(),
                        Phase::Suspect {
                            since: now,
                            stopping: stopping_now,
                        },
                    );
                }
            }
            (true, Some(Phase::Suspect { since, stopping })) => {
                let stopping = stopping || stopping_now;
                if now.saturating_duration_since(since) >= self.policy.grace {
                    self.phases.insert(
                        n.name.clone(),
                        Phase::Dead {
                            skipped: None,
                            stopping,
                        },
                    );
                    if !stopping {
                        out.push(Decision::DeclareDead {
                            node: n.name.clone(),
                        });
                    }
                } else {
                    self.phases
                        .insert(n.name.clone(), Phase::Suspect { since, stopping });
                }
            }
            (true, Some(Phase::Dead { skipped, stopping })) if stopping_now && !stopping => {
                self.phases.insert(
                    n.name.clone(),
                    Phase::Dead {
                        skipped,
                        stopping: true,
                    },
                );
            }
            (true, Some(Phase::Fenced { by, .. })) => {
                // Fenced here, but etcd does not say so while the node is still down: our
                // `fenced` write did not land. Write it again, or recovery (guarded on it)
                // would wait for it forever.
                out.push(Decision::MarkFenced {
                    node: n.name.clone(),
                    by,
                });
            }
            (true, Some(_)) => {}
        }
    }

    /// Start fences where the guard and the caps allow; skips carry their reason.
    fn fence_slots(&mut self, now: Instant, nodes: &[NodeFacts], out: &mut Vec<Decision>) {
        while self
            .started
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.policy.window)
        {
            self.started.pop_front();
        }
        // Nodes that look dead right now (a clean stop and a fenced node do not count).
        let looks_dead = nodes
            .iter()
            .filter(|n| {
                !n.alive
                    && !matches!(
                        n.daemon_state,
                        Some(DaemonState::Stop) | Some(DaemonState::Fenced)
                    )
            })
            .count();
        let total = nodes.len();
        let partition = total > 0 && looks_dead * 2 >= total;
        let waiting: Vec<(String, bool)> = self
            .phases
            .iter()
            .filter_map(|(n, p)| match p {
                Phase::Dead { stopping, .. } => Some((n.clone(), *stopping)),
                _ => None,
            })
            .collect();
        for (name, stopping) in waiting {
            let bmc = nodes.iter().any(|n| n.name == name && n.bmc);
            let reason = if partition {
                Some(format!(
                    "partition guard: {looks_dead} of {total} nodes look dead at once"
                ))
            } else if !self.policy.enabled || !bmc {
                // Nothing to fence with: the fence has failed before it started.
                let why = if !self.policy.enabled {
                    "fencing is disabled (fencing.enabled)"
                } else {
                    "the node publishes no BMC"
                };
                self.failed(&name, why, stopping, out);
                continue;
            } else if self.in_flight() >= self.policy.max_concurrent {
                Some(format!(
                    "fencing.max_concurrent ({}) fences already in flight",
                    self.policy.max_concurrent
                ))
            } else if self.started.len() >= self.policy.max_per_window {
                Some(format!(
                    "fence cap: {} fences in the last {}s",
                    self.started.len(),
                    self.policy.window.as_secs()
                ))
            } else {
                None
            };
            match reason {
                Some(r) => {
                    let dead = Phase::Dead {
                        skipped: Some(r.clone()),
                        stopping,
                    };
                    let again = self.phases.get(&name) == Some(&dead);
                    self.phases.insert(name.clone(), dead);
                    if !again {
                        out.push(Decision::Skip {
                            node: name,
                            reason: r,
                        });
                    }
                }
                None => {
                    self.phases
                        .insert(name.clone(), Phase::Fencing { stopping });
                    self.started.push_back(now);
                    out.push(Decision::Fence { node: name });
                }
            }
        }
    }

    /// Does the policy recover a node fenced `by`? `stopping`: it went down in a clean
    /// stop, so the self-fence bound does not cover its guests.
    fn recovers(&self, by: FencedBy, stopping: bool) -> bool {
        match by {
            FencedBy::Ipmi | FencedBy::Record => {
                self.policy.successful_fence == AfterFence::Migrate
            }
            FencedBy::SelfFence => {
                self.policy.failed_fence == AfterFence::Migrate
                    && self.policy.self_fence
                    && !stopping
            }
        }
    }

    /// A fence did not happen (failed, impossible): the `failed_fence` policy.
    fn failed(&mut self, node: &str, reason: &str, stopping: bool, out: &mut Vec<Decision>) {
        if self.recovers(FencedBy::SelfFence, stopping) {
            self.phases.insert(
                node.to_string(),
                Phase::Fenced {
                    recover: true,
                    by: FencedBy::SelfFence,
                },
            );
            out.push(Decision::MarkFenced {
                node: node.to_string(),
                by: FencedBy::SelfFence,
            });
        } else {
            self.phases.insert(node.to_string(), Phase::Failed);
            let migrate = self.policy.failed_fence == AfterFence::Migrate && self.policy.self_fence;
            let reason = if stopping && migrate {
                format!(
                    "{reason}; the node went down stopping cleanly (`shutdown` recorded, not \
                     `stop`), its guests may still run: the self-fence bound does not hold"
                )
            } else {
                reason.to_string()
            };
            out.push(Decision::FenceFailed {
                node: node.to_string(),
                reason,
            });
        }
    }

    /// The fence of `node` finished: `ok` when the BMC confirmed power Off.
    pub fn fence_done(&mut self, node: &str, ok: bool, reason: &str) -> Vec<Decision> {
        let mut out = Vec::new();
        let Some(&Phase::Fencing { stopping }) = self.phases.get(node) else {
            return out;
        };
        if ok {
            let recover = self.recovers(FencedBy::Ipmi, stopping);
            self.phases.insert(
                node.to_string(),
                Phase::Fenced {
                    recover,
                    by: FencedBy::Ipmi,
                },
            );
            out.push(Decision::MarkFenced {
                node: node.to_string(),
                by: FencedBy::Ipmi,
            });
            if recover {
                out.push(Decision::Recover {
                    node: node.to_string(),
                });
            }
        } else {
            self.failed(node, reason, stopping, &mut out);
            if matches!(
                self.phases.get(node),
                Some(Phase::Fenced { recover: true, .. })
            ) {
                out.push(Decision::Recover {
                    node: node.to_string(),
                });
            }
        }
        out
    }

    /// Recovery of `node` found nothing left to move: stop asking.
    pub fn recovered(&mut self, node: &str) {
        if let Some(Phase::Fenced { recover, .. }) = self.phases.get_mut(node) {
            *recover = false;
        }
    }
}

/// May a node start, crash-restart or receive a guest now? Only while its lease is good for
/// at least `margin` more — checked right before the libvirt call, from the lease keeper's
/// `valid_until`, never from a cached lock — and it is not fenced.
pub fn may_start(
    now: Instant,
    valid_until: Option<Instant>,
    margin: Duration,
    fenced: bool,
) -> bool {
    !fenced && valid_until.is_some_and(|v| now + margin < v)
}

/// Must a node self-fence its guests now (its lease may expire within `margin`)?
pub fn must_self_fence(now: Instant, valid_until: Option<Instant>, margin: Duration) -> bool {
    valid_until.is_none_or(|v| now + margin >= v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> FencingPolicy {
        FencingPolicy {
            enabled: true,
            grace: Duration::from_secs(4),
            max_concurrent: 1,
            window: Duration::from_secs(300),
            max_per_window: 3,
            successful_fence: AfterFence::Migrate,
            failed_fence: AfterFence::None,
            self_fence: true,
        }
    }

    fn facts(name: &str, alive: bool, st: DaemonState) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            alive,
            daemon_state: Some(st),
            bmc: true,
        }
    }

    #[test]
    fn guests_start_only_inside_the_lease_and_are_fenced_a_margin_before_it_ends() {
        let t0 = Instant::now();
        let m = Duration::from_secs(1);
        let until = Some(t0 + Duration::from_secs(5));
        assert!(may_start(t0, until, m, false));
        assert!(!may_start(t0, until, m, true), "fenced");
        assert!(!may_start(t0 + Duration::from_secs(4), until, m, false));
        assert!(!may_start(t0, None, m, false), "lease lost");
        assert!(!must_self_fence(t0 + Duration::from_millis(3999), until, m));
        assert!(must_self_fence(t0 + Duration::from_secs(4), until, m));
        assert!(must_self_fence(t0, None, m));
    }

    #[test]
    fn a_dead_node_is_declared_after_the_grace_fenced_and_recovered() {
        let mut b = FenceBook::new(policy());
        let t0 = Instant::now();
        let view = |alive: bool| {
            vec![
                facts("a", true, DaemonState::Run),
                facts("b", true, DaemonState::Run),
                facts("c", alive, DaemonState::Run),
            ]
        };
        assert_eq!(b.tick(t0, &view(true)), vec![]);
        assert_eq!(b.tick(t0, &view(false)), vec![], "grace starts");
        assert_eq!(b.tick(t0 + Duration::from_secs(3), &view(false)), vec![]);
        let d = b.tick(t0 + Duration::from_secs(4), &view(false));
        assert_eq!(
            d,
            vec![
                Decision::DeclareDead { node: "c".into() },
                Decision::Fence { node: "c".into() }
            ]
        );
        assert_eq!(b.tick(t0 + Duration::from_secs(5), &view(false)), vec![]);
        assert_eq!(
            b.fence_done("c", true, ""),
            vec![
                Decision::MarkFenced {
                    node: "c".into(),
                    by: FencedBy::Ipmi
                },
                Decision::Recover { node: "c".into() }
            ]
        );
    }

    #[test]
    fn a_clean_stop_is_no_death_and_a_node_back_in_the_grace_is_cleared() {
        let mut b = FenceBook::new(policy());
        let t0 = Instant::now();
        let stopped = [
            facts("a", true, DaemonState::Run),
            facts("b", false, DaemonState::Stop),
        ];
        assert_eq!(b.tick(t0, &stopped), vec![]);
        assert_eq!(b.tick(t0 + Duration::from_secs(60), &stopped), vec![]);
        let gone = [
            facts("a", true, DaemonState::Run),
            facts("b", false, DaemonState::Run),
            facts("c", true, DaemonState::Run),
        ];
        b.tick(t0, &gone);
        let back = [
            facts("a", true, DaemonState::Run),
            facts("b", true, DaemonState::Run),
            facts("c", true, DaemonState::Run),
        ];
        assert_eq!(
            b.tick(t0 + Duration::from_secs(1), &back),
            vec![Decision::Cleared { node: "b".into() }]
        );
    }

    #[test]
    fn half_the_cluster_dead_at_once_is_a_partition_and_nothing_is_fenced() {
        let mut b = FenceBook::new(policy());
        let t0 = Instant::now();
        let view = [
            facts("a", true, DaemonState::Run),
            facts("b", false, DaemonState::Run),
            facts("c", false, DaemonState::Run),
            facts("d", true, DaemonState::Run),
        ];
        b.tick(t0, &view);
        let d = b.tick(t0 + Duration::from_secs(4), &view);
        assert!(d.contains(&Decision::DeclareDead { node: "b".into() }));
        assert!(
            d.iter().all(|x| !matches!(x, Decision::Fence { .. })),
            "{d:?}"
        );
        assert!(d.iter().any(|x| matches!(x, Decision::Skip { reason, .. } if reason.contains("partition guard: 2 of 4"))));
        // Reported once, not every tick.
        assert_eq!(b.tick(t0 + Duration::from_secs(5), &view), vec![]);
    }

    #[test]
    fn a_fenced_mark_that_did_not_land_is_written_again_while_the_node_is_down() {
        // Found by the simulator (objects/tests/fencing_sim.rs): the executor's `fenced`
        // write failed once, and recovery — guarded on `daemon_state = fenced` — waited
        // for it forever, since the book never asked for it again.
        let mut b = FenceBook::new(policy());
        let t0 = Instant::now();
        let view = |c: DaemonState| {
            vec![
                facts("a", true, DaemonState::Run),
                facts("b", true, DaemonState::Run),
                facts("c", false, c),
            ]
        };
        b.tick(t0, &view(DaemonState::Run));
        b.tick(t0 + Duration::from_secs(4), &view(DaemonState::Run));
        assert_eq!(
            b.fence_done("c", true, "")[0],
            Decision::MarkFenced {
                node: "c".into(),
                by: FencedBy::Ipmi
            }
        );
        // etcd still says `dead`: the mark again, then the recovery.
        assert_eq!(
            b.tick(t0 + Duration::from_secs(5), &view(DaemonState::Dead)),
            vec![
                Decision::MarkFenced {
                    node: "c".into(),
                    by: FencedBy::Ipmi
                },
                Decision::Recover { node: "c".into() }
            ]
        );
        // It landed: only the recovery.
        assert_eq!(
            b.tick(t0 + Duration::from_secs(6), &view(DaemonState::Fenced)),
            vec![Decision::Recover { node: "c".into() }]
        );
        // Back (alive) before the mark landed: nothing to write, nothing to recover.
        let mut b = FenceBook::new(policy());
        b.tick(t0, &view(DaemonState::Run));
        b.tick(t0 + Duration::from_secs(4), &view(DaemonState::Run));
        b.fence_done("c", true, "");
        let back = [
            facts("a", true, DaemonState::Run),
            facts("b", true, DaemonState::Run),
            facts("c", true, DaemonState::Run),
        ];
        assert_eq!(b.tick(t0 + Duration::from_secs(5), &back), vec![]);
    }

    #[test]
    fn a_failed_fence_recovers_only_with_migrate_and_self_fence() {
        for (failed, self_fence, recovers) in [
            (AfterFence::None, true, false),
            (AfterFence::Migrate, false, false),
            (AfterFence::Migrate, true, true),
        ] {
            let mut p = policy();
            p.failed_fence = failed;
            p.self_fence = self_fence;
            let mut b = FenceBook::new(p);
            let t0 = Instant::now();
            let view = [
                facts("a", true, DaemonState::Run),
                facts("b", true, DaemonState::Run),
                facts("c", false, DaemonState::Run),
            ];
            b.tick(t0, &view);
            b.tick(t0 + Duration::from_secs(4), &view);
            let d = b.fence_done("c", false, "BMC unreachable");
            assert_eq!(
                d.contains(&Decision::Recover { node: "c".into() }),
                recovers,
                "{failed:?} self_fence={self_fence}: {d:?}"
            );
        }
    }

    #[test]
    fn a_node_down_in_a_clean_stop_is_recovered_only_after_a_confirmed_fence() {
        // Found by the simulator (s30): a clean stop whose `stop` write failed leaves
        // `shutdown`, its guests running and no lease. With `failed_fence: migrate` a failed
        // fence used to trust the self-fence bound and recover: the VMs ran twice.
        let mut p = policy();
        p.failed_fence = AfterFence::Migrate;
        let t0 = Instant::now();
        let view = [
            facts("a", true, DaemonState::Run),
            facts("b", true, DaemonState::Run),
            facts("c", false, DaemonState::Shutdown),
        ];
        for ok in [false, true] {
            let mut b = FenceBook::new(p.clone());
            assert_eq!(b.tick(t0, &view), vec![]);
            // No `dead` over `shutdown`: that record tells later primaries too.
            assert_eq!(
                b.tick(t0 + Duration::from_secs(4), &view),
                vec![Decision::Fence { node: "c".into() }]
            );
            let d = b.fence_done("c", ok, "BMC unreachable");
            if ok {
                assert_eq!(
                    d,
                    vec![
                        Decision::MarkFenced {
                            node: "c".into(),
                            by: FencedBy::Ipmi
                        },
                        Decision::Recover { node: "c".into() }
                    ]
                );
            } else {
                assert!(
                    matches!(&d[..], [Decision::FenceFailed { reason, .. }] if reason.contains("self-fence bound does not hold")),
                    "{d:?}"
                );
                assert_eq!(b.tick(t0 + Duration::from_secs(5), &view), vec![]);
            }
        }
        // `shutdown` seen only after the grace began (the record landed late) counts too.
        let mut b = FenceBook::new(p);
        let run = [
            facts("a", true, DaemonState::Run),
            facts("b", true, DaemonState::Run),
            facts("c", false, DaemonState::Run),
        ];
        b.tick(t0, &run);
        b.tick(t0 + Duration::from_secs(1), &view);
        b.tick(t0 + Duration::from_secs(4), &view);
        let d = b.fence_done("c", false, "BMC unreachable");
        assert!(matches!(&d[..], [Decision::FenceFailed { .. }]), "{d:?}");
    }

    #[test]
    fn recovery_waits_while_a_fenced_node_is_alive_and_resumes_when_it_is_down() {
        // Found by the simulator (s18, s25): a node fenced over IPMI keeps its lease (and
        // `alive`) up to a TTL after the power off; seeing it alive used to cancel its
        // recovery for good, so its VMs never moved.
        let mut b = FenceBook::new(policy());
        let t0 = Instant::now();
        let view = |alive: bool, st: DaemonState| {
            vec![
                facts("a", true, DaemonState::Run),
                facts("b", true, DaemonState::Run),
                facts("c", alive, st),
            ]
        };
        b.tick(t0, &view(false, DaemonState::Run));
        b.tick(t0 + Duration::from_secs(4), &view(false, DaemonState::Run));
        b.fence_done("c", true, "");
        // Alive (a lingering lease), fenced: nothing asked.
        assert_eq!(
            b.tick(
                t0 + Duration::from_secs(5),
                &view(true, DaemonState::Fenced)
            ),
            vec![]
        );
        // The lease ended: recovery resumes.
        assert_eq!(
            b.tick(
                t0 + Duration::from_secs(6),
                &view(false, DaemonState::Fenced)
            ),
            vec![Decision::Recover { node: "c".into() }]
        );
        b.recovered("c");
        assert_eq!(
            b.tick(
                t0 + Duration::from_secs(7),
                &view(false, DaemonState::Fenced)
            ),
            vec![]
        );
        // A successor that first sees the fenced node alive recovers it once it is down.
        let mut b = FenceBook::new(policy());
        assert_eq!(b.tick(t0, &view(true, DaemonState::Fenced)), vec![]);
        assert_eq!(
            b.tick(
                t0 + Duration::from_secs(1),
                &view(false, DaemonState::Fenced)
            ),
            vec![Decision::Recover { node: "c".into() }]
        );
    }
}
