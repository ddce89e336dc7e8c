//! The role signal: whether this node is the primary coordinator right now, as one shared,
//! changing value fed by the election — never a bool copied at startup. Every primary-only
//! duty (floating addresses, network gateways and dnsmasq, Ceph collection and objects,
//! `invalid` reports of VMs nobody else reports, node status) follows it, resyncs when it
//! changes, and acknowledges the generation it has applied, so the election can bring the
//! duties up before it writes `primary` and tear them down before it resigns.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// The role as published: primary or not, and a generation that grows with every change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role {
    /// This node is the primary coordinator.
    pub primary: bool,
    /// Grows by one with every change.
    pub generation: u64,
}

/// Each duty's name and the generation it applied (`u64::MAX`: none yet).
type Applied = Vec<(&'static str, watch::Receiver<u64>)>;

/// Runs around a promotion: handed the publish, it must call it. The guardian's heartbeat
/// tells its process "primary" before any duty can bring an address up, so a daemon killed
/// right after it won still has its duties released.
pub type PromotionGuard = Arc<dyn Fn(&mut dyn FnMut()) + Send + Sync>;

/// The election's end: sets the role and waits for the duties to apply it.
#[derive(Clone)]
pub struct RoleSender {
    tx: Arc<watch::Sender<Role>>,
    duties: Arc<Mutex<Applied>>,
    promotion: Arc<Mutex<Option<PromotionGuard>>>,
}

/// A duty's end: follows the role and acknowledges what it applied.
pub struct Duty {
    name: &'static str,
    rx: watch::Receiver<Role>,
    applied: watch::Sender<u64>,
}

/// Read-only view of the role, for code that only asks "am I primary now?".
#[derive(Clone)]
pub struct RoleView(watch::Receiver<Role>);

impl RoleSender {
    /// A role signal starting as `primary`.
    pub fn new(primary: bool) -> RoleSender {
        let (tx, _) = watch::channel(Role {
            primary,
            generation: 0,
        });
        RoleSender {
            tx: Arc::new(tx),
            duties: Arc::new(Mutex::new(Vec::new())),
            promotion: Arc::new(Mutex::new(None)),
        }
    }

    /// Run every later promotion through `guard` (see [`PromotionGuard`]).
    pub fn guard_promotions(&self, guard: PromotionGuard) {
        *self.promotion.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
    }

    /// May a duty hold the primary's host state now: the role is primary, or a duty has
    /// not yet applied the demotion (its addresses may still be up).
    pub fn may_hold_duties(&self) -> bool {
        let role = self.get();
        role.primary
            || self
                .duties
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|(_, rx)| {
                    let g = *rx.borrow();
                    g != u64::MAX && g < role.generation
                })
    }

    /// A new duty that follows this role; it counts for [`RoleSender::applied`].
    pub fn duty(&self, name: &'static str) -> Duty {
        let (applied, rx) = watch::channel(u64::MAX);
        self.duties
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, rx));
        Duty {
            name,
            rx: self.tx.subscribe(),
            applied,
        }
    }

    /// A read-only view.
    pub fn view(&self) -> RoleView {
        RoleView(self.tx.subscribe())
    }

    /// The role now.
    pub fn get(&self) -> Role {
        *self.tx.borrow()
    }

    /// Change the role (no-op when it already is `primary`); returns the generation to wait
    /// for.
    pub fn set(&self, primary: bool) -> u64 {
        let guard = self
            .promotion
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match guard {
            Some(guard) if primary && !self.get().primary => {
                let mut generation = 0;
                guard(&mut || generation = self.publish(primary));
                generation
            }
            _ => self.publish(primary),
        }
    }

    /// Publish the role to the duties.
    fn publish(&self, primary: bool) -> u64 {
        let mut generation = 0;
        self.tx.send_if_modified(|r| {
            generation = r.generation;
            if r.primary == primary {
                return false;
            }
            r.primary = primary;
            r.generation += 1;
            generation = r.generation;
            true
        });
        generation
    }

    /// Wait until every duty applied `generation` (or a later one), at most `timeout`;
    /// returns the names of the duties that did not.
    pub async fn applied(&self, generation: u64, timeout: Duration) -> Vec<&'static str> {
        let duties: Applied = self
            .duties
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let wait = async {
            for (_, rx) in &duties {
                let mut rx = rx.clone();
                let _ = rx.wait_for(|g| *g != u64::MAX && *g >= generation).await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        duties
            .iter()
            .filter(|(_, rx)| {
                let g = *rx.borrow();
                g == u64::MAX || g < generation
            })
            .map(|(n, _)| *n)
            .collect()
    }
}

impl Duty {
    /// The duty's name (logs).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The role now.
    pub fn role(&self) -> Role {
        *self.rx.borrow()
    }

    /// Wait for the next change of the role; `None` when the sender is gone.
    pub async fn changed(&mut self) -> Option<Role> {
        self.rx.changed().await.ok()?;
        Some(*self.rx.borrow_and_update())
    }

    /// The duty applied `role`.
    pub fn done(&self, role: Role) {
        self.applied.send_replace(role.generation);
    }
}

impl RoleView {
    /// Is this node the primary right now?
    pub fn is_primary(&self) -> bool {
        self.0.borrow().primary
    }

    /// Wait for the next change; `None` when the sender is gone.
    pub async fn changed(&mut self) -> Option<Role> {
        self.0.changed().await.ok()?;
        Some(*self.0.borrow_and_update())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn duties_acknowledge_the_generation_they_applied() {
        let role = RoleSender::new(false);
        let mut a = role.duty("a");
        let b = role.duty("b");
        b.done(b.role());
        let g = role.set(true);
        assert_eq!(g, 1);
        assert_eq!(role.set(true), 1, "no change, same generation");
        assert_eq!(
            role.applied(g, Duration::from_millis(50)).await,
            vec!["a", "b"]
        );
        let r = a.changed().await.expect("change");
        assert!(r.primary);
        a.done(r);
        assert_eq!(role.applied(g, Duration::from_millis(50)).await, vec!["b"]);
        b.done(b.role());
        assert!(role.applied(g, Duration::from_secs(1)).await.is_empty());
        assert!(role.view().is_primary());
    }

    #[tokio::test]
    async fn a_promotion_runs_through_its_guard_and_a_demotion_holds_until_applied() {
        let role = RoleSender::new(false);
        let a = role.duty("a");
        a.done(a.role());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (r, log) = (role.clone(), seen.clone());
        role.guard_promotions(Arc::new(move |publish: &mut dyn FnMut()| {
            let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
            l.push(("before", r.get().primary));
            publish();
            l.push(("after", r.get().primary));
        }));
        assert!(!role.may_hold_duties());
        assert_eq!(role.set(true), 1);
        assert_eq!(
            *seen.lock().unwrap_or_else(|p| p.into_inner()),
            [("before", false), ("after", true)],
            "the guard sees the promotion before the duties do, and publishes it"
        );
        assert!(role.may_hold_duties());
        a.done(a.role());
        assert_eq!(role.set(false), 2);
        assert_eq!(
            seen.lock().unwrap_or_else(|p| p.into_inner()).len(),
            2,
            "a demotion does not go through the guard"
        );
        assert!(
            role.may_hold_duties(),
            "duty a has not applied the demotion: its addresses may still be up"
        );
        a.done(a.role());
        assert!(!role.may_hold_duties());
    }
}
