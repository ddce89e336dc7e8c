//! The keepalive tick: one transaction per tick with `health` and `last_seen` (and `info`
//! when hostname, addresses or versions changed), guarded by a compare that our lease still
//! holds `alive`. Skipped with a warning while the store is away. Also pings the systemd
//! watchdog and triggers the reactors' resync.
//!
//! Liveness is the lease, refreshed by its own task: a slow tick never costs the lease.
//! Ceph is reported from the Ceph monitor's watch channel (see `cephmon`), never asked here;
//! the allocation of the domains from the stats sampler's channel (see `vmstats`): the tick
//! asks libvirt only its O(1) probe, whatever the number of VMs.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use debvisor_objects::histogram::Histogram;
use debvisor_objects::node::{Health, NodeInfo, VmCounts};
use debvisor_objects::schema::{self, NodeField};
use debvisor_objects::{Store, TxnBuilder};
use tracing::{debug, info, warn};

use crate::hostinfo;
use crate::hypervisor::{DomainStats, Libvirt};
use crate::reactors::domain::DomainHost;
use crate::vmstats::StatsView;

/// Outcome of one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickOutcome {
    /// Written in one transaction.
    Written,
    /// The compare failed: `lease` (the one this tick used) no longer holds `alive` —
    /// re-register, unless the daemon already holds a newer lease.
    NotRegistered { lease: i64 },
    /// The store did not answer; nothing written.
    StoreUnreachable,
}

/// State carried from tick to tick.
pub struct Keepalive {
    store: Store,
    node: String,
    lease: Arc<AtomicI64>,
    libvirt: Libvirt,
    started: Instant,
    /// `info` as last written; rewritten when it differs (shared with the repair of the
    /// node's own keys, which compares it with etcd).
    written_info: Arc<std::sync::Mutex<NodeInfo>>,
    base_info: NodeInfo,
    outage_since: Option<Instant>,
    /// The Domain object: its foreign domains and held removals.
    domains: Option<Arc<DomainHost>>,
    /// The stats sampler's outputs: allocation for `health`, counters for `/metrics`.
    stats: Option<StatsView>,
    /// Empty counters when no sampler runs (`/metrics` reads them).
    no_counters: Arc<std::sync::Mutex<Vec<DomainStats>>>,
    /// How long each tick's transaction took (sent to answered or failed), for `/metrics`.
    txn_latency: Arc<Histogram>,
    /// The Ceph monitor's latest node summary (`ceph.enabled`); read, never waited for.
    ceph: Option<crate::reactors::ceph_monitor::CephHealthRx>,
    /// The latest round-trip times to peers; read, never waited for.
    peers: Option<crate::peers::PeersRx>,
}

/// Current `info` of this host from the registration base plus fresh kernel facts.
pub fn refresh_info(base: &NodeInfo, libvirt_version: Option<String>) -> NodeInfo {
    let mut i = base.clone();
    i.hostname = hostinfo::hostname();
    i.addresses = hostinfo::addresses();
    i.cpus = hostinfo::cpus();
    i.memory_mib = hostinfo::memory().total_mib;
    i.kernel = hostinfo::kernel();
    if libvirt_version.is_some() {
        i.libvirt_version = libvirt_version;
    }
    i
}

impl Keepalive {
    /// A keepalive for `node` whose registration wrote `written`; `base` holds the static
    /// facts (version, node id, rack) that fresh kernel facts are layered on.
    pub fn new(
        store: Store,
        node: String,
        lease: Arc<AtomicI64>,
        libvirt: Libvirt,
        written: NodeInfo,
        base: NodeInfo,
    ) -> Keepalive {
        Keepalive {
            store,
            node,
            lease,
            libvirt,
            started: Instant::now(),
            written_info: Arc::new(std::sync::Mutex::new(written)),
            base_info: base,
            outage_since: None,
            domains: None,
            stats: None,
            no_counters: Arc::default(),
            txn_latency: Arc::default(),
            ceph: None,
            peers: None,
        }
    }

    /// Report the round-trip times to peers measured by the peers task.
    pub fn with_peers(mut self, rx: crate::peers::PeersRx) -> Keepalive {
        self.peers = Some(rx);
        self
    }

    /// Report Ceph as the Ceph monitor last saw it (`health.ceph`, and a `problems` line
    /// when it is not `HEALTH_OK`). The tick only reads the channel: it never calls Ceph.
    pub fn with_ceph(mut self, rx: crate::reactors::ceph_monitor::CephHealthRx) -> Keepalive {
        self.ceph = Some(rx);
        self
    }

    /// Report the Domain object's foreign domains and held removals.
    pub fn with_domains(mut self, domains: Arc<DomainHost>) -> Keepalive {
        self.domains = Some(domains);
        self
    }

    /// Report the allocation (and a failed sample) of the stats sampler.
    pub fn with_stats(mut self, view: StatsView) -> Keepalive {
        self.stats = Some(view);
        self
    }

    /// Wait (at most `timeout`) for the sampler's first sample, so that the first tick
    /// reports the allocation rather than nothing.
    pub async fn wait_first_sample(&mut self, timeout: std::time::Duration) {
        if let Some(v) = &mut self.stats {
            let first = v.summary.wait_for(|s| s.sampled);
            if tokio::time::timeout(timeout, first).await.is_err() {
                warn!(node = %self.node, timeout_ms = timeout.as_millis() as u64, "no domain stats sample yet; the first keepalive reports no allocation");
            }
        }
    }

    /// `info` as this node last wrote it.
    pub fn info_written(&self) -> NodeInfo {
        self.written_info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A handle on `info` as last written, for the repair of the node's own keys.
    pub fn info_handle(&self) -> Arc<std::sync::Mutex<NodeInfo>> {
        self.written_info.clone()
    }

    /// The domain counters of the last stats sample (shared, updated by the sampler).
    pub fn stats_handle(&self) -> Arc<std::sync::Mutex<Vec<DomainStats>>> {
        match &self.stats {
            Some(v) => v.counters.clone(),
            None => self.no_counters.clone(),
        }
    }

    /// The durations of the ticks' transactions (shared, one observation per tick that
    /// reached the store).
    pub fn txn_latency_handle(&self) -> Arc<Histogram> {
        self.txn_latency.clone()
    }

    /// Collect health (libvirt probe bounded by its timeout) and write it.
    pub async fn tick(&mut self) -> TickOutcome {
        let probe = self.libvirt.probe().await;
        let mut problems = Vec::new();
        let (libvirt_ok, vms, version) = match &probe {
            Ok(p) => (
                true,
                VmCounts {
                    total: p.running + p.defined,
                    running: p.running,
                },
                Some(p.version.clone()),
            ),
            Err(e) => {
                problems.push(e.to_string());
                (false, VmCounts::default(), None)
            }
        };
        let (alloc, stats_error) = match &self.stats {
            Some(v) => {
                let s = v.summary.borrow();
                (s.allocation.clone(), s.error.clone())
            }
            None => Default::default(),
        };
        if let (true, Some(e)) = (libvirt_ok, stats_error) {
            problems.push(e);
        }
        let foreign = self
            .domains
            .as_ref()
            .map(|d| d.foreign().into_values().collect())
            .unwrap_or_default();
        let removals_held = self.domains.as_ref().and_then(|d| d.removals_held());
        if let Some(h) = &removals_held {
            problems.push(format!(
                "{} removal(s) held: {} — confirm with `debvisorctl node confirm-removals {}`",
                h.count, h.reason, self.node
            ));
        }
        let ceph = self.ceph.as_ref().and_then(|rx| rx.borrow().clone());
        if let Some(line) = ceph.as_ref().and_then(|c| c.problem()) {
            problems.push(line);
        }
        let health = Health {
            ceph,
            libvirt: libvirt_ok,
            load: hostinfo::load(),
            memory: hostinfo::memory(),
            vms,
            alloc,
            foreign,
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: hostinfo::uptime_s(),
            daemon_uptime_s: self.started.elapsed().as_secs(),
            problems,
            removals_held,
            peers: self
                .peers
                .as_ref()
                .map(|rx| rx.borrow().clone())
                .unwrap_or_default(),
        };
        let info = refresh_info(
            &self.base_info,
            version.or_else(|| self.info_written().libvirt_version),
        );
        let info_changed = info != self.info_written();
        let now = hostinfo::now_rfc3339();
        let lease = self.lease.load(Ordering::SeqCst);
        let alive = schema::node_key(&self.node, NodeField::Alive);
        let mut t = TxnBuilder::new()
            .lease_is(&alive, lease)
            .put(
                &schema::node_key(&self.node, NodeField::Health),
                serde_json::to_vec(&health).unwrap_or_default(),
            )
            .put(&schema::node_key(&self.node, NodeField::LastSeen), now);
        if info_changed {
            t = t.put(
                &schema::node_key(&self.node, NodeField::Info),
                serde_json::to_vec(&info).unwrap_or_default(),
            );
        }
        let sent = Instant::now();
        let written = self.store.txn(t).await;
        self.txn_latency.observe(sent.elapsed());
        match written {
            Ok(r) if r.succeeded() => {
                if let Some(since) = self.outage_since.take() {
                    info!(node = %self.node, outage_ms = since.elapsed().as_millis() as u64, "store reachable again; keepalive resumed");
                }
                if info_changed {
                    info!(node = %self.node, hostname = %info.hostname, addresses = ?info.addresses,
                        libvirt_version = ?info.libvirt_version, "node info changed; rewritten");
                    *self.written_info.lock().unwrap_or_else(|p| p.into_inner()) = info;
                }
                debug!(node = %self.node, "keepalive written");
                TickOutcome::Written
            }
            Ok(_) => {
                warn!(node = %self.node, lease = format!("{lease:x}"), "keepalive refused: this node's lease no longer holds its alive key");
                TickOutcome::NotRegistered { lease }
            }
            Err(e) => {
                if self.outage_since.is_none() {
                    self.outage_since = Some(Instant::now());
                    warn!(node = %self.node, error = %e, "store unreachable; keepalive skipped (VMs and networks stay as they are)");
                } else {
                    debug!(node = %self.node, error = %e, "store still unreachable; keepalive skipped");
                }
                TickOutcome::StoreUnreachable
            }
        }
    }
}
