//! The node lease: granted at registration, refreshed by its own task at TTL/3, independent
//! of anything slow (stats, libvirt, Ceph). Its state is published on a watch channel so the
//! daemon can re-register when the lease is lost.
//!
//! With every good refresh the task also publishes `valid_until`: the instant (monotonic)
//! the refresh request was sent plus the TTL etcd granted. The server cannot expire the lease
//! before that instant, so a node that acts only while `now < valid_until − margin` never
//! acts on a lease that is already gone: the primary demotes itself and (later) a node fences
//! its guests a margin before it.

use std::time::{Duration, Instant};

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::{Store, StoreError};

/// What the lease task knows about the node lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Refreshed recently; `ttl` is the remaining TTL etcd reported.
    Alive {
        id: i64,
        ttl: i64,
        /// Send time of the last good refresh + its TTL: the lease lives at least until then.
        valid_until: Instant,
    },
    /// The store did not answer the last refresh; the lease may still be alive, at least
    /// until `valid_until` (from the last good refresh).
    Unreachable { id: i64, valid_until: Instant },
    /// etcd says the lease no longer exists: every key bound to it is gone.
    Lost { id: i64 },
}

impl LeaseState {
    /// The lease id this state is about.
    pub fn id(&self) -> i64 {
        match *self {
            LeaseState::Alive { id, .. }
            | LeaseState::Unreachable { id, .. }
            | LeaseState::Lost { id } => id,
        }
    }

    /// Until when the lease surely lives (`None` once it is lost).
    pub fn valid_until(&self) -> Option<Instant> {
        match *self {
            LeaseState::Alive { valid_until, .. } | LeaseState::Unreachable { valid_until, .. } => {
                Some(valid_until)
            }
            LeaseState::Lost { .. } => None,
        }
    }
}

/// A refresher for one lease that reuses its keep-alive stream between refreshes.
pub struct LeaseRefresher {
    store: Store,
    id: i64,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl LeaseRefresher {
    /// A refresher for lease `id`.
    pub fn new(store: Store, id: i64) -> Self {
        LeaseRefresher {
            store,
            id,
            stream: None,
        }
    }

    /// Refresh once. `Ok(ttl)` with `ttl > 0` when alive, `Ok(0)` when the lease is gone.
    pub async fn refresh(&mut self) -> Result<i64, StoreError> {
        if self.stream.is_none() {
            match self.store.lease_keep_alive(self.id).await? {
                None => return Ok(0),
                // Opening the stream refreshed the lease.
                Some(s) => {
                    self.stream = Some(s);
                    return self.store.lease_ttl(self.id).await.map(|t| t.max(0));
                }
            }
        }
        let timeout = self.store.request_timeout();
        let Some((keeper, stream)) = self.stream.as_mut() else {
            return Ok(0);
        };
        let round = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        let res = tokio::time::timeout(timeout, round).await;
        match res {
            Ok(Ok(Some(resp))) => Ok(resp.ttl().max(0)),
            Ok(Ok(None)) => {
                self.stream = None;
                Err(StoreError::Request {
                    op: "lease_keep_alive",
                    message: "stream closed".into(),
                })
            }
            Ok(Err(e)) => {
                self.stream = None;
                Err(StoreError::Request {
                    op: "lease_keep_alive",
                    message: crate::store::error_chain(&e),
                })
            }
            Err(_) => {
                self.stream = None;
                Err(StoreError::Timeout {
                    op: "lease_keep_alive",
                    timeout,
                })
            }
        }
    }
}

/// Spawn the task that keeps lease `id` alive until `cancel` fires or the lease is lost,
/// publishing its state into `tx` (one channel for the node's life: a keeper started after a
/// re-registration publishes into the same one). `granted` is when the grant request was sent
/// (the lease lives at least `ttl` from then). Logs one line per state transition (not per
/// refresh).
pub fn spawn_keeper(
    store: Store,
    node: String,
    id: i64,
    ttl: Duration,
    granted: Instant,
    tx: watch::Sender<LeaseState>,
    cancel: CancellationToken,
) {
    tx.send_replace(LeaseState::Alive {
        id,
        ttl: ttl.as_secs() as i64,
        valid_until: granted + ttl,
    });
    let period = (ttl / 3).max(Duration::from_millis(200));
    tokio::spawn(async move {
        let mut refresher = LeaseRefresher::new(store, id);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unreachable_since: Option<Instant> = None;
        let mut valid_until = granted + ttl;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let sent = Instant::now();
            let refreshed = refresher.refresh().await;
            let metrics = refresher.store.metrics();
            // A lease etcd no longer knows counts as a failed renewal too.
            match &refreshed {
                Ok(ttl_left) if *ttl_left > 0 => metrics.lease_renewals.observe(sent.elapsed()),
                _ => {
                    metrics
                        .lease_renewal_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            match refreshed {
                Ok(ttl_left) if ttl_left > 0 => {
                    valid_until = valid_until.max(sent + Duration::from_secs(ttl_left as u64));
                    if let Some(since) = unreachable_since.take() {
                        info!(node = %node, lease = id, ttl = ttl_left, outage_ms = since.elapsed().as_millis() as u64,
                            "lease refreshed again after store outage");
                    }
                    tx.send_replace(LeaseState::Alive {
                        id,
                        ttl: ttl_left,
                        valid_until,
                    });
                }
                Ok(_) => {
                    warn!(node = %node, lease = id, "node lease lost: etcd no longer knows it; peers see this node as dead");
                    tx.send_replace(LeaseState::Lost { id });
                    return;
                }
                Err(e) => {
                    if unreachable_since.is_none() {
                        unreachable_since = Some(Instant::now());
                        warn!(node = %node, lease = id, error = %e, "cannot refresh node lease: store unreachable");
                    }
                    tx.send_replace(LeaseState::Unreachable { id, valid_until });
                }
            }
        }
    });
}
