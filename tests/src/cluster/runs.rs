//! The run recorder: where each VM runs, all the time, from the nodes' own libvirtds —
//! so a test can prove that a VM never ran on two nodes at once (fencing, recovery,
//! migration), not just at the instants it looked.
//!
//! One thread (a current-thread tokio runtime) per cluster: for each node's isolated
//! libvirtd, a lifecycle event subscription (`Libvirt::events`, which reconnects by itself
//! after libvirtd died and came back) stamped on arrival, and every [`LIST_PERIOD`] a domain
//! list of every node (the safety net for events lost while a libvirtd or the subscription
//! was down). A node's BMC adds the instant the node died (see the `boot` module): its
//! guests stop then, without any event. The observations go into a [`RunLog`]; the
//! intervals, overlaps and current placement are computed from it on demand (see the
//! `runlog` module for the rules).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use debvisor_daemon::hypervisor::{DomainEvent, DomainState, Libvirt, Lifecycle};

use super::runlog::{DoubleRun, DoubleRuns, Observation, RunInterval, RunLog, Seen};
use super::{lock, wait_until};
use crate::error::{HarnessError, IoContext, Result};

/// Time between two domain lists of every node.
pub const LIST_PERIOD: Duration = Duration::from_millis(250);
/// Timeout of one libvirt call of the recorder.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether a VM in `state` runs (its vCPUs may execute).
pub fn state_runs(state: DomainState) -> bool {
    matches!(
        state,
        DomainState::Running | DomainState::Blocked | DomainState::ShuttingDown
    )
}

/// Whether a VM runs after lifecycle event `e` (`None`: the event says nothing about it).
pub fn event_runs(e: &Lifecycle) -> Option<bool> {
    match e {
        // The destination of a migration starts paused; it runs from `resumed migrated`.
        Lifecycle::Started { reason } => Some(reason != "migrated"),
        Lifecycle::Resumed { .. } => Some(true),
        Lifecycle::Suspended { .. }
        | Lifecycle::Stopped { .. }
        | Lifecycle::PmSuspended
        | Lifecycle::Crashed { .. } => Some(false),
        Lifecycle::Defined { .. }
        | Lifecycle::Undefined
        | Lifecycle::ShuttingDown { .. }
        | Lifecycle::Other { .. } => None,
    }
}

/// A short description of a lifecycle event (`started booted`, `stopped destroyed`).
fn describe(e: &Lifecycle) -> String {
    match e {
        Lifecycle::Started { reason } => format!("started {reason}"),
        Lifecycle::Resumed { reason } => format!("resumed {reason}"),
        Lifecycle::Suspended { reason } => format!("suspended {reason}"),
        Lifecycle::Stopped { reason } => format!("stopped {reason:?}").to_lowercase(),
        Lifecycle::Crashed { reason } => format!("crashed {reason}"),
        other => format!("{other:?}"),
    }
}

/// What the recorder counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Lifecycle events recorded.
    pub events: u64,
    /// Domain lists recorded (all nodes).
    pub lists: u64,
    /// Domain lists that failed (a node down, libvirtd restarting).
    pub list_failures: u64,
    /// Rounds of lists (one list attempt per node each).
    pub rounds: u64,
}

#[derive(Debug, Default)]
struct Inner {
    log: Mutex<RunLog>,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    events: AtomicU64,
    lists: AtomicU64,
    list_failures: AtomicU64,
    rounds: AtomicU64,
}

/// One node the recorder watches: its name and its libvirtd's URI and qemu run dir.
#[derive(Debug, Clone)]
pub(super) struct Watched {
    pub node: String,
    pub uri: String,
    pub qemu_run_dir: std::path::PathBuf,
}

/// A handle on the cluster's run recorder (cheap to clone; see the module documentation).
#[derive(Debug, Clone)]
pub struct Runs {
    inner: Arc<Inner>,
}

impl Runs {
    /// Start recording `nodes`; returns once every event subscription is registered and a
    /// first round of lists is in.
    pub(super) fn start(nodes: Vec<Watched>) -> Result<Runs> {
        let runs = Runs {
            inner: Arc::new(Inner::default()),
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let r = runs.clone();
        let h = std::thread::Builder::new()
            .name("run recorder".into())
            .spawn(move || r.run(nodes, ready_tx))
            .ctx(|| "spawning the run recorder".to_owned())?;
        *lock(&runs.inner.thread) = Some(h);
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => Ok(runs),
            Ok(Err(e)) => {
                runs.stop();
                Err(HarnessError::State(format!("the run recorder: {e}")))
            }
            Err(_) => {
                runs.stop();
                Err(HarnessError::State(
                    "the run recorder did not start within 30 s".into(),
                ))
            }
        }
    }

    /// The thread: subscribe, then list periodically until stopped.
    fn run(
        &self,
        nodes: Vec<Watched>,
        ready: std::sync::mpsc::Sender<std::result::Result<(), String>>,
    ) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(format!("tokio runtime: {e}")));
                return;
            }
        };
        rt.block_on(async {
            let drivers: Vec<(String, Libvirt)> = nodes
                .iter()
                .map(|w| {
                    let lv = Libvirt::new(&w.uri, CALL_TIMEOUT)
                        .with_qemu_run_dir(Some(w.qemu_run_dir.clone()));
                    (w.node.clone(), lv)
                })
                .collect();
            let mut tasks = Vec::new();
            for (node, lv) in &drivers {
                match lv.events().await {
                    Ok(rx) => tasks.push(tokio::spawn(self.clone().events(node.clone(), rx))),
                    Err(e) => {
                        let _ = ready.send(Err(format!("events of {node}: {e}")));
                        return;
                    }
                }
            }
            self.list_round(&drivers).await;
            let _ = ready.send(Ok(()));
            while !self.inner.stop.load(Ordering::SeqCst) {
                tokio::time::sleep(LIST_PERIOD).await;
                self.list_round(&drivers).await;
            }
            for t in tasks {
                t.abort();
            }
        });
    }

    /// Record `node`'s lifecycle events until stopped (the subscription reconnects by
    /// itself).
    async fn events(self, node: String, mut rx: tokio::sync::mpsc::Receiver<DomainEvent>) {
        while let Some(ev) = rx.recv().await {
            let at = Instant::now();
            let DomainEvent::Lifecycle { uuid, event, .. } = ev else {
                continue;
            };
            let Some(running) = event_runs(&event) else {
                continue;
            };
            self.inner.events.fetch_add(1, Ordering::Relaxed);
            self.push(Observation {
                at,
                node: node.clone(),
                seen: Seen::Event {
                    uuid,
                    running,
                    what: describe(&event),
                },
            });
        }
    }

    /// List every node once (concurrently).
    async fn list_round(&self, drivers: &[(String, Libvirt)]) {
        let lists = drivers.iter().map(|(node, lv)| async move {
            let sent = Instant::now();
            let r = lv.list().await;
            (node, sent, Instant::now(), r)
        });
        for (node, sent, at, r) in futures::future::join_all(lists).await {
            match r {
                Ok(domains) => {
                    let running: BTreeSet<String> = domains
                        .into_iter()
                        .filter(|d| state_runs(d.state))
                        .map(|d| d.uuid)
                        .collect();
                    self.inner.lists.fetch_add(1, Ordering::Relaxed);
                    self.push(Observation {
                        at,
                        node: node.clone(),
                        seen: Seen::List { sent, running },
                    });
                }
                Err(_) => {
                    self.inner.list_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.inner.rounds.fetch_add(1, Ordering::SeqCst);
    }

    fn push(&self, o: Observation) {
        lock(&self.inner.log).push(o);
    }

    /// Node `node` died at `at` (its BMC powered it off): its guests stop then.
    pub(super) fn node_down(&self, node: &str, at: Instant) {
        self.push(Observation {
            at,
            node: node.to_owned(),
            seen: Seen::Down,
        });
    }

    /// A copy of everything recorded.
    pub fn log(&self) -> RunLog {
        lock(&self.inner.log).clone()
    }

    /// The intervals during which VM `uuid` ran, on every node, by start.
    pub fn intervals(&self, uuid: &str) -> Vec<RunInterval> {
        lock(&self.inner.log).intervals(uuid)
    }

    /// Every time a VM ran on two nodes at once (see [`RunLog::overlaps`]).
    pub fn overlaps(&self) -> Vec<DoubleRun> {
        lock(&self.inner.log).overlaps()
    }

    /// The invariant over everything recorded so far: no VM ever ran on two nodes at once.
    /// `Err` lists every overlap. (To include what happened just before, call
    /// [`Runs::sync`] first.)
    pub fn check(&self) -> std::result::Result<(), DoubleRuns> {
        lock(&self.inner.log).check()
    }

    /// Panic listing every double run, if there is any ([`Runs::check`]).
    #[track_caller]
    pub fn assert_no_double_run(&self) {
        if let Err(e) = self.check() {
            panic!("{e}");
        }
    }

    /// The node VM `uuid` runs on now, as recorded (`None`: nowhere). If it runs on several
    /// (a double run) the first by name.
    pub fn running_on(&self, uuid: &str) -> Option<String> {
        lock(&self.inner.log).running_on(uuid).into_iter().next()
    }

    /// Wait until VM `uuid` runs on `node`; the instant its interval there began.
    pub fn wait_running_on(&self, uuid: &str, node: &str, timeout: Duration) -> Result<Instant> {
        wait_until(&format!("VM {uuid} running on {node}"), timeout, || {
            self.intervals(uuid)
                .into_iter()
                .find(|i| i.node == node && i.end.is_none())
                .map(|i| i.start)
        })
    }

    /// Wait until `n` more rounds of lists are in (everything that happened before this
    /// call has then been listed, if events missed it).
    pub fn sync(&self, n: u64, timeout: Duration) -> Result<()> {
        let target = self.inner.rounds.load(Ordering::SeqCst) + n;
        wait_until("run recorder list rounds", timeout, || {
            (self.inner.rounds.load(Ordering::SeqCst) >= target).then_some(())
        })
    }

    /// What was recorded so far.
    pub fn stats(&self) -> RunStats {
        RunStats {
            events: self.inner.events.load(Ordering::Relaxed),
            lists: self.inner.lists.load(Ordering::Relaxed),
            list_failures: self.inner.list_failures.load(Ordering::Relaxed),
            rounds: self.inner.rounds.load(Ordering::SeqCst),
        }
    }

    /// Stop recording and wait for the thread (idempotent; the cluster does it on drop).
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(h) = lock(&self.inner.thread).take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use debvisor_daemon::hypervisor::StopReason;

    #[test]
    fn what_counts_as_running() {
        let s = |r: &str| r.to_owned();
        assert_eq!(
            event_runs(&Lifecycle::Started {
                reason: s("booted")
            }),
            Some(true)
        );
        assert_eq!(
            event_runs(&Lifecycle::Started {
                reason: s("migrated")
            }),
            Some(false)
        );
        assert_eq!(
            event_runs(&Lifecycle::Resumed {
                reason: s("migrated")
            }),
            Some(true)
        );
        assert_eq!(
            event_runs(&Lifecycle::Suspended {
                reason: s("paused")
            }),
            Some(false)
        );
        assert_eq!(
            event_runs(&Lifecycle::Stopped {
                reason: StopReason::Failed
            }),
            Some(false)
        );
        assert_eq!(event_runs(&Lifecycle::Defined { updated: false }), None);
        assert!(state_runs(DomainState::Running));
        assert!(!state_runs(DomainState::Paused));
        assert!(!state_runs(DomainState::Shutoff));
        assert_eq!(
            describe(&Lifecycle::Stopped {
                reason: StopReason::Destroyed
            }),
            "stopped destroyed"
        );
    }
}
