//! The store witness: which etcd this daemon talks to, as seen in the headers of its own
//! linearizable answers — the cluster id and the highest revision seen.
//!
//! etcd's revision never goes backwards within one cluster, and a linearizable answer is at
//! least as new as every answer received before the request was sent. So an answer with a
//! lower revision than that floor, or from another cluster id, means the store was replaced
//! under us: a wiped data dir (same cluster id, revision back near 1), a restore from a
//! snapshot, a new cluster on the same endpoint. Keys that vanished then are no evidence
//! that anyone deleted them: the daemon holds every removal that would destroy host state
//! until an operator confirms (`debvisorctl node confirm-removals`).
//!
//! The known mark is kept in the state dir across restarts, so a daemon that starts against
//! a store that went back is warned at its first request.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::error;

/// What identifies the store and how far it has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreMark {
    /// etcd's cluster id.
    pub cluster_id: u64,
    /// The highest revision seen in a linearizable answer.
    pub revision: i64,
}

/// The store was found replaced: what was known, what answered, and why that is a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreChange {
    /// One line for logs, health and `debvisorctl`.
    pub reason: String,
    /// RFC 3339 time it was noticed.
    pub since: String,
    /// What was known before.
    pub before: StoreMark,
    /// What answered.
    pub after: StoreMark,
}

/// Tracks the store's identity from response headers; shared by every clone of a `Store`.
#[derive(Debug)]
pub struct Witness {
    known: Mutex<Option<StoreMark>>,
    change: watch::Sender<Option<StoreChange>>,
}

impl Default for Witness {
    fn default() -> Self {
        Witness {
            known: Mutex::new(None),
            change: watch::channel(None).0,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Witness {
    /// Start from a mark remembered from an earlier run (kept only if nothing was seen yet).
    pub fn seed(&self, mark: StoreMark) {
        let mut k = lock(&self.known);
        if k.is_none() {
            *k = Some(mark);
        }
    }

    /// The current mark, to remember across restarts.
    pub fn mark(&self) -> Option<StoreMark> {
        *lock(&self.known)
    }

    /// The revision every answer to a request sent now must reach.
    pub fn floor(&self) -> i64 {
        lock(&self.known).map_or(0, |m| m.revision)
    }

    /// An answer of a linearizable request sent when the floor was `floor`.
    pub fn observe(&self, op: &str, cluster_id: u64, revision: i64, floor: i64) {
        let after = StoreMark {
            cluster_id,
            revision,
        };
        let mut k = lock(&self.known);
        let Some(before) = *k else {
            *k = Some(after);
            return;
        };
        let reason = if before.cluster_id != cluster_id {
            format!(
                "etcd cluster id changed from {:x} to {cluster_id:x} (a new or restored cluster answers)",
                before.cluster_id
            )
        } else if revision < floor {
            format!(
                "etcd revision went back from {floor} to {revision} (data dir wiped or restored from an older snapshot)"
            )
        } else {
            if revision > before.revision {
                *k = Some(after);
            }
            return;
        };
        *k = Some(after);
        drop(k);
        error!(op, before_revision = before.revision, after_revision = revision, reason = %reason,
            "store replaced under this node: removals that would destroy guests or networks are held until an operator confirms (debvisorctl node confirm-removals)");
        let change = StoreChange {
            reason,
            since: now_rfc3339(),
            before,
            after,
        };
        self.change.send_modify(|c| {
            if c.is_none() {
                *c = Some(change);
            }
        });
    }

    /// The unconfirmed change, if the store was found replaced.
    pub fn change(&self) -> Option<StoreChange> {
        self.change.borrow().clone()
    }

    /// An operator confirmed the store as it is now: forget the change.
    pub fn accept(&self) {
        self.change.send_replace(None);
    }

    /// Follow changes (e.g. to report them in health).
    pub fn subscribe(&self) -> watch::Receiver<Option<StoreChange>> {
        self.change.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_answer_sets_the_mark_and_later_ones_raise_it() {
        let w = Witness::default();
        assert_eq!(w.floor(), 0);
        w.observe("get", 7, 100, 0);
        assert_eq!(w.floor(), 100);
        w.observe("get", 7, 150, 100);
        assert_eq!(
            w.mark(),
            Some(StoreMark {
                cluster_id: 7,
                revision: 150
            })
        );
        assert_eq!(w.change(), None);
    }

    #[test]
    fn answers_that_overtook_each_other_are_no_change() {
        let w = Witness::default();
        w.observe("get", 7, 100, 0);
        // Two requests sent at floor 100; the later answer (120) arrives first.
        w.observe("txn", 7, 120, 100);
        w.observe("get", 7, 110, 100);
        assert_eq!(w.change(), None);
        assert_eq!(w.floor(), 120);
    }

    #[test]
    fn a_revision_below_the_floor_is_a_change() {
        let w = Witness::default();
        w.observe("get", 7, 500, 0);
        w.observe("get", 7, 3, 500);
        let c = w.change().expect("change");
        assert!(c.reason.contains("went back from 500 to 3"), "{}", c.reason);
        assert_eq!(c.before.revision, 500);
        // The new store is now the known one: no second change for it.
        w.observe("get", 7, 4, 3);
        assert_eq!(w.change().map(|c| c.after.revision), Some(3));
        w.accept();
        assert_eq!(w.change(), None);
    }

    #[test]
    fn another_cluster_id_is_a_change_and_a_seed_counts_as_known() {
        let w = Witness::default();
        w.seed(StoreMark {
            cluster_id: 1,
            revision: 40,
        });
        w.observe("get", 2, 900, 40);
        assert!(w.change().expect("change").reason.contains("cluster id"));
        // A seed after the first answer is ignored.
        w.seed(StoreMark {
            cluster_id: 9,
            revision: 1,
        });
        assert_eq!(w.mark().map(|m| m.cluster_id), Some(2));
    }
}
