//! The Domain state machine, planned purely: desired VM + ownership + what this host runs →
//! the next actions. The invariant it protects: a VM is only started by the node that holds
//! its lock (a lease-bound key won by transaction), and a VM running here while another live
//! node holds the lock is stopped (split-brain guard). No I/O here; every branch is
//! unit-tested; the executor performs the actions through the `Hypervisor` trait and the
//! store.

use std::time::Duration;

use crate::domain::{DesiredState, MigrationMethod, Vm};

/// What this host reports about one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalState {
    Running,
    Paused,
    ShutOff,
    Crashed,
}

/// The domain as this host has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub state: LocalState,
    /// Defined persistently (survives a stop).
    pub persistent: bool,
    /// The host's definition matches the desired XML (the executor decides how to compare).
    pub xml_current: bool,
    /// Defined by DebVisor (it carries our metadata mark). A domain without the mark is
    /// someone else's: never defined over, started, stopped, destroyed or undefined.
    pub ours: bool,
}

/// Everything the planner looks at for one VM on this node.
#[derive(Debug, Clone)]
pub struct Situation<'a> {
    /// Desired state; `None` when the VM was removed from etcd.
    pub vm: Option<&'a Vm>,
    /// The domain with the VM's UUID on this host, if any.
    pub local: Option<Local>,
    /// This node's name and current lease.
    pub me: &'a str,
    pub my_lease: i64,
    /// Time since we asked the guest to shut down (ACPI), if we did.
    pub shutdown_elapsed: Option<Duration>,
    /// How long a guest gets to obey ACPI before it is destroyed.
    pub shutdown_timeout: Duration,
    /// Consecutive failed starts (crash loop protection).
    pub failed_starts: u32,
    /// Failed starts after which the VM goes to `fail`.
    pub max_failed_starts: u32,
    /// For `restart`: the guest has been down since the request (now it may start again).
    pub restart_done: bool,
    /// A live migration for the current request failed here (fall back, or give up when
    /// `migrate-live` forced it).
    pub live_failed: bool,
}

/// One action; the executor runs them in order and stops at the first failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Win the lock by transaction (lock absent or already ours) and set `owner` to us.
    AcquireLock,
    /// Drop our lock (transaction: only if it is ours).
    ReleaseLock,
    /// Define (or redefine) the domain from the desired XML.
    Define,
    Start,
    /// Ask the guest to shut down (ACPI).
    Shutdown,
    /// Power off now.
    Destroy,
    /// Remove the definition from this host.
    Undefine,
    /// Migrate the running domain live, peer-to-peer, to the target node.
    LiveMigrate,
    /// Give the VM to its target: drop our lock, set `owner` to the target and `last_node`
    /// to us, in one transaction guarded on our lock.
    Handover,
    /// `unmigrate`: set the target `node` to `last_node` (guarded on `node`).
    Retarget,
    /// The requested transition (restart, migrate*, unmigrate) is complete: `state` back to
    /// `start` (guarded on `state`); `unmigrate` also clears `last_node`.
    Settle,
    /// Report the VM's state (written only when it changes).
    Report {
        state: &'static str,
        reason: String,
    },
}

/// The outcome of planning: steps, plus when to look again (e.g. while a guest shuts down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub recheck: Option<Duration>,
}

fn plan(steps: Vec<Step>) -> Plan {
    Plan {
        steps,
        recheck: None,
    }
}

fn report(state: &'static str, reason: impl Into<String>) -> Step {
    Step::Report {
        state,
        reason: reason.into(),
    }
}

fn running(l: &Option<Local>) -> bool {
    matches!(
        l,
        Some(Local {
            state: LocalState::Running | LocalState::Paused,
            ..
        })
    )
}

/// Bring the domain down: ACPI first, destroy after the timeout; `hard` destroys at once.
fn power_off(s: &Situation, hard: bool, then: Vec<Step>) -> Plan {
    if !running(&s.local) {
        return plan(then);
    }
    if hard {
        let mut steps = vec![Step::Destroy];
        steps.extend(then);
        return plan(steps);
    }
    match s.shutdown_elapsed {
        Some(e) if e >= s.shutdown_timeout => {
            let mut steps = vec![
                Step::Destroy,
                report(
                    "stopped",
                    format!(
                        "guest ignored ACPI shutdown for {}s; destroyed",
                        e.as_secs()
                    ),
                ),
            ];
            steps.extend(
                then.into_iter()
                    .filter(|x| !matches!(x, Step::Report { .. })),
            );
            plan(steps)
        }
        Some(e) => Plan {
            steps: vec![],
            recheck: Some((s.shutdown_timeout - e).min(Duration::from_secs(5))),
        },
        None => Plan {
            steps: vec![
                Step::Shutdown,
                report("shutting-down", "ACPI shutdown sent"),
            ],
            recheck: Some(Duration::from_secs(1)),
        },
    }
}

/// Whether [`plan_vm`] asks for the run lock first whatever this host reports about a
/// domain of ours: absent, or carrying our mark in any state and shape (`s.local` is not
/// looked at). Derived from [`plan_vm`] itself, so the two cannot drift apart. The executor
/// then sends the lock transaction while it still looks at the host (one etcd commit
/// overlapped with the libvirt lookups on the start path, issue 17) and plans with what the
/// host said afterwards.
pub fn locks_first(s: &Situation) -> bool {
    let asks = |local: Option<Local>| {
        let s = Situation { local, ..s.clone() };
        plan_vm(&s).steps == [Step::AcquireLock]
    };
    asks(None)
        && [
            LocalState::Running,
            LocalState::Paused,
            LocalState::ShutOff,
            LocalState::Crashed,
        ]
        .into_iter()
        .all(|state| {
            [(true, true), (true, false), (false, false)]
                .into_iter()
                .all(|(persistent, xml_current)| {
                    asks(Some(Local {
                        state,
                        persistent,
                        xml_current,
                        ours: true,
                    }))
                })
        })
}

/// Plan the next steps for one VM on this node.
pub fn plan_vm(s: &Situation) -> Plan {
    if s.local.as_ref().is_some_and(|l| !l.ours) {
        // Someone else's domain carries the VM's UUID: touch nothing. Say so when the VM
        // is meant to run here (it cannot: its UUID is taken on this host).
        // A lock in our name (e.g. won before the host was seen) is given back: no domain of
        // ours can run here under this UUID.
        let give_back =
            s.vm.and_then(|vm| vm.lock.as_ref())
                .is_some_and(|l| l.node == s.me);
        let mut steps = Vec::new();
        if give_back {
            steps.push(Step::ReleaseLock);
        }
        if s.vm.is_some_and(|vm| vm.node.as_deref() == Some(s.me)) {
            steps.push(report(
                "fail",
                "a domain with this UUID on this host was not defined by DebVisor; left alone",
            ));
        }
        return plan(steps);
    }
    let Some(vm) = s.vm else {
        // Removed from etcd: take down and forget our copy.
        let mut then = vec![];
        if s.local.is_some() {
            then.push(Step::Undefine);
        }
        return power_off(s, true, then);
    };
    let lock_ours = vm
        .lock
        .as_ref()
        .map(|l| l.node == s.me && l.lease == s.my_lease)
        .unwrap_or(false);
    // A lock in our name from an earlier lease of ours (node names are unique among live
    // daemons) is ours to release or take over by revision, never another holder.
    let lock_mine = vm.lock.as_ref().is_some_and(|l| l.node == s.me);
    let lock_other = vm.lock.as_ref().filter(|l| l.node != s.me);
    let target_me = vm.node.as_deref() == Some(s.me);

    // Split-brain guard: running here while another node holds the lock. Not for an
    // incoming migration: the holder is moving it here and hands the lock over after.
    let incoming = target_me && vm.state.is_migration();
    if let Some(other) = lock_other {
        if running(&s.local) && other.lease != 0 && !incoming {
            return plan(vec![
                Step::Destroy,
                report(
                    "stopped",
                    format!(
                        "split-brain guard: lock held by {} (lease {:x}); stopped here",
                        other.node, other.lease
                    ),
                ),
            ]);
        }
    }

    if target_me && vm.state == DesiredState::Unmigrate {
        match vm.last_node.as_deref() {
            Some(last) if last != s.me => {
                return plan(vec![
                    Step::Retarget,
                    report("migrating", format!("returning to {last}")),
                ])
            }
            Some(_) => {} // already back on its last node: settle below
            None => {
                return plan(vec![report(
                    "fail",
                    "unmigrate: the VM has no last_node to return to",
                )])
            }
        }
    }

    if !target_me {
        // Not ours to run: hand it over (live when allowed), or make sure it does not run
        // here; then leave nothing behind.
        let target = vm.node.as_deref().unwrap_or("-");
        let migrating = vm.state.is_migration();
        let live_allowed = vm.state == DesiredState::MigrateLive
            || vm.metadata.migration_method == MigrationMethod::Live;
        if migrating && lock_mine && running(&s.local) && live_allowed {
            if !s.live_failed {
                return plan(vec![
                    report("migrating", format!("live migration to {target}")),
                    Step::LiveMigrate,
                ]);
            }
            if vm.state == DesiredState::MigrateLive {
                return plan(vec![report(
                    "fail",
                    format!("live migration to {target} failed; migrate-live forbids the shutdown fallback"),
                )]);
            }
        }
        let mut then = Vec::new();
        if lock_mine {
            then.push(if migrating {
                Step::Handover
            } else {
                Step::ReleaseLock
            });
        }
        if s.local.is_some() {
            then.push(Step::Undefine);
        }
        return power_off(s, false, then);
    }

    match vm.state {
        DesiredState::Start
        | DesiredState::Restart
        | DesiredState::Migrate
        | DesiredState::MigrateLive
        | DesiredState::Unmigrate => {
            if let Some(other) = lock_other {
                if other.lease != 0 {
                    // Its holder reports the VM (e.g. while migrating it here); we wait
                    // for the lock to be released or its lease to expire.
                    return plan(vec![]);
                }
            }
            if vm.state == DesiredState::Restart && !s.restart_done {
                return power_off(s, false, vec![]);
            }
            if !lock_ours {
                // A lock without a lease (hand-written) or none at all: take it by transaction.
                return Plan {
                    steps: vec![Step::AcquireLock],
                    recheck: Some(Duration::from_millis(0)),
                };
            }
            if s.failed_starts >= s.max_failed_starts && !running(&s.local) {
                return plan(vec![report(
                    "fail",
                    format!(
                        "{} failed starts in a row; set state again to retry",
                        s.failed_starts
                    ),
                )]);
            }
            let mut steps = Vec::new();
            let current = s
                .local
                .as_ref()
                .map(|l| l.xml_current && l.persistent)
                .unwrap_or(false);
            if !current && !running(&s.local) {
                steps.push(Step::Define);
            }
            if !running(&s.local) {
                steps.push(Step::Start);
            }
            let settle = vm.state != DesiredState::Start && running(&s.local);
            steps.push(report(
                "running",
                if !steps.is_empty() && vm.state == DesiredState::Start {
                    "started"
                } else if vm.state.is_migration() {
                    "migrated"
                } else if vm.state == DesiredState::Restart {
                    "restarted"
                } else {
                    "running"
                },
            ));
            if settle {
                steps.push(Step::Settle);
            }
            plan(steps)
        }
        // Another live node still holds the lock (e.g. a failed migrate-live left the VM
        // there): it stops the VM and reports it; the target neither defines nor reports.
        DesiredState::Shutdown | DesiredState::Stop | DesiredState::Disable
            if lock_other.is_some_and(|o| o.lease != 0) =>
        {
            plan(vec![])
        }
        DesiredState::Shutdown => {
            let mut then = vec![report("stopped", "shut down")];
            if lock_mine {
                then.insert(0, Step::ReleaseLock);
            }
            power_off(s, false, then)
        }
        DesiredState::Stop | DesiredState::Disable => {
            let state = if vm.state == DesiredState::Disable {
                "disabled"
            } else {
                "stopped"
            };
            let mut then = vec![report(state, format!("state {}", vm.state))];
            if lock_mine {
                then.insert(0, Step::ReleaseLock);
            }
            if s.local.is_none()
                || !s
                    .local
                    .as_ref()
                    .map(|l| l.xml_current && l.persistent)
                    .unwrap_or(false)
            {
                // Keep it defined here so an operator sees it in `virsh list --all`.
                then.insert(0, Step::Define);
            }
            power_off(s, true, then)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{LockHolder, Metadata};

    fn vm(state: DesiredState, node: &str, lock: Option<(&str, i64)>) -> Vm {
        Vm {
            uuid: "8f3c2a1e-5b7d-4c9a-9e1f-0a2b3c4d5e6f".into(),
            name: "vm".into(),
            xml: String::new(),
            state,
            node: Some(node.into()),
            metadata: Metadata::default(),
            owner: None,
            lock: lock.map(|(n, l)| LockHolder {
                node: n.into(),
                lease: l,
                revision: 1,
            }),
            last_node: None,
            flushed_from: None,
        }
    }

    fn sit<'a>(v: Option<&'a Vm>, local: Option<LocalState>) -> Situation<'a> {
        Situation {
            vm: v,
            local: local.map(|state| Local {
                state,
                persistent: true,
                xml_current: true,
                ours: true,
            }),
            me: "hv1",
            my_lease: 10,
            shutdown_elapsed: None,
            shutdown_timeout: Duration::from_secs(180),
            failed_starts: 0,
            max_failed_starts: 3,
            restart_done: false,
            live_failed: false,
        }
    }

    #[test]
    fn a_domain_we_did_not_define_is_never_touched_whatever_etcd_says() {
        let foreign = |state| Local {
            state,
            persistent: true,
            xml_current: false,
            ours: false,
        };
        let states = [
            DesiredState::Start,
            DesiredState::Stop,
            DesiredState::Shutdown,
            DesiredState::Disable,
            DesiredState::Restart,
            DesiredState::Migrate,
            DesiredState::MigrateLive,
            DesiredState::Unmigrate,
        ];
        for local in [LocalState::Running, LocalState::ShutOff, LocalState::Paused] {
            // Removed from etcd (a stray key written and deleted): nothing.
            let mut s = sit(None, None);
            s.local = Some(foreign(local));
            assert_eq!(steps(&plan_vm(&s)), vec![], "removed, {local:?}");
            for state in states {
                for (target, lock) in [
                    ("hv1", None),
                    ("hv2", Some(("hv2", 20))),
                    ("hv1", Some(("hv2", 20))),
                ] {
                    let v = vm(state, target, lock);
                    let mut s = sit(Some(&v), None);
                    s.local = Some(foreign(local));
                    let p = plan_vm(&s);
                    assert_eq!(
                        steps(&p),
                        vec![],
                        "{state} on {target} lock {lock:?}, {local:?}"
                    );
                    let want = (target == "hv1").then_some("fail");
                    assert_eq!(reported(&p), want, "{state} on {target}, {local:?}");
                }
            }
        }
    }

    fn steps(p: &Plan) -> Vec<Step> {
        p.steps
            .iter()
            .filter(|s| !matches!(s, Step::Report { .. }))
            .cloned()
            .collect()
    }

    fn reported(p: &Plan) -> Option<&'static str> {
        p.steps.iter().find_map(|s| match s {
            Step::Report { state, .. } => Some(*state),
            _ => None,
        })
    }

    #[test]
    fn start_takes_the_lock_first_then_defines_and_starts() {
        let v = vm(DesiredState::Start, "hv1", None);
        assert_eq!(
            steps(&plan_vm(&sit(Some(&v), None))),
            vec![Step::AcquireLock]
        );
        let v = vm(DesiredState::Start, "hv1", Some(("hv1", 10)));
        assert_eq!(
            steps(&plan_vm(&sit(Some(&v), None))),
            vec![Step::Define, Step::Start]
        );
        let mut s = sit(Some(&v), Some(LocalState::ShutOff));
        assert_eq!(
            steps(&plan_vm(&s)),
            vec![Step::Start],
            "defined and current: just start"
        );
        s.local = Some(Local {
            state: LocalState::ShutOff,
            persistent: true,
            xml_current: false,
            ours: true,
        });
        assert_eq!(
            steps(&plan_vm(&s)),
            vec![Step::Define, Step::Start],
            "changed XML is redefined before start"
        );
        let p = plan_vm(&sit(Some(&v), Some(LocalState::Running)));
        assert_eq!(steps(&p), vec![]);
        assert_eq!(reported(&p), Some("running"));
    }

    #[test]
    fn never_starts_while_another_live_node_holds_the_lock() {
        let v = vm(DesiredState::Start, "hv1", Some(("hv2", 20)));
        let p = plan_vm(&sit(Some(&v), None));
        assert_eq!(steps(&p), vec![]);
        assert_eq!(reported(&p), None, "the lock holder reports the VM");
        // Our own lock from an earlier lease is taken over by revision, not waited for —
        // and a guest running under it is never stopped by the split-brain guard.
        let v = vm(DesiredState::Start, "hv1", Some(("hv1", 9)));
        assert_eq!(
            steps(&plan_vm(&sit(Some(&v), None))),
            vec![Step::AcquireLock]
        );
        let p = plan_vm(&sit(Some(&v), Some(LocalState::Running)));
        assert_eq!(steps(&p), vec![Step::AcquireLock]);
        let v = vm(DesiredState::Stop, "hv1", Some(("hv1", 9)));
        assert_eq!(
            steps(&plan_vm(&sit(Some(&v), Some(LocalState::Running)))),
            vec![Step::Destroy, Step::ReleaseLock]
        );
        // A lock without a lease is stale: take it by transaction.
        let v = vm(DesiredState::Start, "hv1", Some(("hv2", 0)));
        assert_eq!(
            steps(&plan_vm(&sit(Some(&v), None))),
            vec![Step::AcquireLock]
        );
    }

    #[test]
    fn split_brain_guard_stops_a_vm_locked_elsewhere() {
        for state in [
            DesiredState::Start,
            DesiredState::Stop,
            DesiredState::Shutdown,
        ] {
            for target in ["hv1", "hv2"] {
                let v = vm(state, target, Some(("hv2", 20)));
                let p = plan_vm(&sit(Some(&v), Some(LocalState::Running)));
                assert_eq!(steps(&p), vec![Step::Destroy], "{state} target {target}");
            }
        }
    }

    #[test]
    fn shutdown_sends_acpi_then_destroys_after_the_timeout() {
        let v = vm(DesiredState::Shutdown, "hv1", Some(("hv1", 10)));
        let mut s = sit(Some(&v), Some(LocalState::Running));
        let p = plan_vm(&s);
        assert_eq!(steps(&p), vec![Step::Shutdown]);
        assert!(p.recheck.is_some());
        s.shutdown_elapsed = Some(Duration::from_secs(60));
        let p = plan_vm(&s);
        assert_eq!(steps(&p), vec![], "wait for the guest");
        assert!(p.recheck.is_some_and(|d| d <= Duration::from_secs(5)));
        s.shutdown_elapsed = Some(Duration::from_secs(180));
        let p = plan_vm(&s);
        assert_eq!(steps(&p), vec![Step::Destroy, Step::ReleaseLock]);
        assert_eq!(reported(&p), Some("stopped"));
        // Once off: release the lock and report.
        let p = plan_vm(&sit(Some(&v), Some(LocalState::ShutOff)));
        assert_eq!(steps(&p), vec![Step::ReleaseLock]);
    }

    #[test]
    fn stop_and_disable_destroy_at_once_and_keep_the_definition() {
        for (state, rep) in [
            (DesiredState::Stop, "stopped"),
            (DesiredState::Disable, "disabled"),
        ] {
            let v = vm(state, "hv1", Some(("hv1", 10)));
            let p = plan_vm(&sit(Some(&v), Some(LocalState::Running)));
            assert_eq!(steps(&p), vec![Step::Destroy, Step::ReleaseLock]);
            assert_eq!(reported(&p), Some(rep));
            let p = plan_vm(&sit(Some(&v), None));
            assert_eq!(steps(&p), vec![Step::Define, Step::ReleaseLock]);
        }
    }

    #[test]
    fn the_target_leaves_a_vm_locked_elsewhere_to_its_holder() {
        for state in [
            DesiredState::Stop,
            DesiredState::Shutdown,
            DesiredState::Disable,
        ] {
            let v = vm(state, "hv1", Some(("hv2", 20)));
            let p = plan_vm(&sit(Some(&v), None));
            assert_eq!(p.steps, vec![], "{state}: no define, no report");
        }
    }

    #[test]
    fn a_node_that_is_not_the_target_leaves_nothing_behind() {
        let v = vm(DesiredState::Start, "hv2", Some(("hv1", 10)));
        let p = plan_vm(&sit(Some(&v), Some(LocalState::Running)));
        assert_eq!(steps(&p), vec![Step::Shutdown], "graceful first");
        let p = plan_vm(&sit(Some(&v), Some(LocalState::ShutOff)));
        assert_eq!(steps(&p), vec![Step::ReleaseLock, Step::Undefine]);
        let v = vm(DesiredState::Start, "hv2", None);
        assert_eq!(
            steps(&plan_vm(&sit(Some(&v), Some(LocalState::ShutOff)))),
            vec![Step::Undefine]
        );
        assert_eq!(steps(&plan_vm(&sit(Some(&v), None))), vec![]);
    }

    #[test]
    fn a_vm_removed_from_etcd_is_destroyed_and_undefined() {
        assert_eq!(
            steps(&plan_vm(&sit(None, Some(LocalState::Running)))),
            vec![Step::Destroy, Step::Undefine]
        );
        assert_eq!(
            steps(&plan_vm(&sit(None, Some(LocalState::ShutOff)))),
            vec![Step::Undefine]
        );
        assert_eq!(steps(&plan_vm(&sit(None, None))), vec![]);
    }

    #[test]
    fn restart_powers_off_then_starts_then_settles() {
        let v = vm(DesiredState::Restart, "hv1", Some(("hv1", 10)));
        let mut s = sit(Some(&v), Some(LocalState::Running));
        assert_eq!(steps(&plan_vm(&s)), vec![Step::Shutdown]);
        s.restart_done = true;
        s.local = Some(Local {
            state: LocalState::ShutOff,
            persistent: true,
            xml_current: true,
            ours: true,
        });
        assert_eq!(steps(&plan_vm(&s)), vec![Step::Start]);
        s.local = Some(Local {
            state: LocalState::Running,
            persistent: true,
            xml_current: true,
            ours: true,
        });
        assert_eq!(steps(&plan_vm(&s)), vec![Step::Settle]);
    }

    #[test]
    fn migration_source_goes_live_or_falls_back() {
        let mut v = vm(DesiredState::Migrate, "hv2", Some(("hv1", 10)));
        let mut s = sit(Some(&v), Some(LocalState::Running));
        let p = plan_vm(&s);
        assert_eq!(steps(&p), vec![Step::LiveMigrate]);
        assert_eq!(reported(&p), Some("migrating"));
        // Live failed: shutdown migration, then hand over.
        s.live_failed = true;
        assert_eq!(steps(&plan_vm(&s)), vec![Step::Shutdown]);
        s.local = Some(Local {
            state: LocalState::ShutOff,
            persistent: true,
            xml_current: true,
            ours: true,
        });
        assert_eq!(steps(&plan_vm(&s)), vec![Step::Handover, Step::Undefine]);
        // migrate-live forbids the fallback.
        v.state = DesiredState::MigrateLive;
        let mut s = sit(Some(&v), Some(LocalState::Running));
        s.live_failed = true;
        let p = plan_vm(&s);
        assert_eq!(steps(&p), vec![]);
        assert_eq!(reported(&p), Some("fail"));
        // Method shutdown never tries live.
        v.state = DesiredState::Migrate;
        v.metadata.migration_method = MigrationMethod::Shutdown;
        let s = sit(Some(&v), Some(LocalState::Running));
        assert_eq!(steps(&plan_vm(&s)), vec![Step::Shutdown]);
        // A plain retarget (state start) releases instead of handing over.
        let v = vm(DesiredState::Start, "hv2", Some(("hv1", 10)));
        let s = sit(Some(&v), Some(LocalState::ShutOff));
        assert_eq!(steps(&plan_vm(&s)), vec![Step::ReleaseLock, Step::Undefine]);
    }

    #[test]
    fn migration_target_adopts_and_settles() {
        let v = vm(DesiredState::Migrate, "hv1", Some(("hv1", 10)));
        let p = plan_vm(&sit(Some(&v), Some(LocalState::Running)));
        assert_eq!(steps(&p), vec![Step::Settle]);
        assert_eq!(reported(&p), Some("running"));
        let v = vm(DesiredState::Migrate, "hv1", Some(("hv2", 20)));
        assert_eq!(steps(&plan_vm(&sit(Some(&v), None))), vec![]);
        // The incoming domain runs here before the source hands the lock over: no guard.
        let p = plan_vm(&sit(Some(&v), Some(LocalState::Paused)));
        assert_eq!(steps(&p), vec![]);
        let p = plan_vm(&sit(Some(&v), Some(LocalState::Running)));
        assert_eq!(steps(&p), vec![]);
    }

    #[test]
    fn unmigrate_retargets_to_last_node() {
        let mut v = vm(DesiredState::Unmigrate, "hv1", Some(("hv1", 10)));
        v.last_node = Some("hv2".into());
        let p = plan_vm(&sit(Some(&v), Some(LocalState::Running)));
        assert_eq!(steps(&p), vec![Step::Retarget]);
        v.last_node = None;
        let p = plan_vm(&sit(Some(&v), Some(LocalState::Running)));
        assert_eq!(reported(&p), Some("fail"));
        // Back home: settle.
        v.last_node = Some("hv1".into());
        let p = plan_vm(&sit(Some(&v), Some(LocalState::Running)));
        assert_eq!(steps(&p), vec![Step::Settle]);
    }

    #[test]
    fn crash_loops_end_in_fail() {
        let v = vm(DesiredState::Start, "hv1", Some(("hv1", 10)));
        let mut s = sit(Some(&v), Some(LocalState::Crashed));
        s.failed_starts = 2;
        assert_eq!(steps(&plan_vm(&s)), vec![Step::Start]);
        s.failed_starts = 3;
        let p = plan_vm(&s);
        assert_eq!(steps(&p), vec![]);
        assert_eq!(reported(&p), Some("fail"));
    }

    /// `locks_first`: the plan is the lock for every host view of a domain of ours (or
    /// none), the typical start asks for it, and a foreign domain never gets the lock — a
    /// lock of ours is given back instead.
    #[test]
    fn locks_first_is_the_plan_for_every_host_view_of_ours() {
        let v = vm(DesiredState::Start, "hv1", None);
        assert!(locks_first(&sit(Some(&v), None)));
        let v = vm(DesiredState::Start, "hv1", Some(("hv2", 5)));
        assert!(!locks_first(&sit(Some(&v), None)), "a live holder");
        let v = vm(DesiredState::Restart, "hv1", None);
        assert!(!locks_first(&sit(Some(&v), None)), "restart not done");
        let locks = [
            None,
            Some(("hv1", 10)),
            Some(("hv1", 7)),
            Some(("hv1", 0)),
            Some(("hv2", 5)),
            Some(("hv2", 0)),
        ];
        let mut asked = 0;
        for &state in DesiredState::ALL {
            for node in ["hv1", "hv2"] {
                for lock in locks {
                    for last in [None, Some("hv1"), Some("hv2")] {
                        let mut v = vm(state, node, lock);
                        v.last_node = last.map(Into::into);
                        for (restart_done, my_lease, live_failed) in
                            [(false, 10, false), (true, 10, true), (true, 0, false)]
                        {
                            let mut s = sit(Some(&v), Some(LocalState::Running));
                            s.restart_done = restart_done;
                            s.my_lease = my_lease;
                            s.live_failed = live_failed;
                            let first = locks_first(&s);
                            for local in [
                                None,
                                Some(LocalState::Running),
                                Some(LocalState::ShutOff),
                                Some(LocalState::Crashed),
                            ] {
                                let mut s = s.clone();
                                s.local = local.map(|state| Local {
                                    state,
                                    persistent: true,
                                    xml_current: false,
                                    ours: true,
                                });
                                if first {
                                    assert_eq!(plan_vm(&s).steps, vec![Step::AcquireLock]);
                                }
                            }
                            asked += usize::from(first);
                            let mut foreign = s.clone();
                            foreign.local = Some(Local {
                                state: LocalState::ShutOff,
                                persistent: true,
                                xml_current: false,
                                ours: false,
                            });
                            let p = plan_vm(&foreign);
                            assert!(!p.steps.contains(&Step::AcquireLock));
                            assert_eq!(
                                p.steps.contains(&Step::ReleaseLock),
                                lock.is_some_and(|(n, _)| n == "hv1"),
                                "{p:?}"
                            );
                            assert!(!p.steps.iter().any(|x| matches!(
                                x,
                                Step::Start | Step::Destroy | Step::Define | Step::Undefine
                            )));
                        }
                    }
                }
            }
        }
        assert!(asked > 0, "no case asked for the lock");
    }
}
