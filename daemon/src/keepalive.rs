//! The keepalive tick: one transaction per tick with `health` and `last_seen` (and `info`
//! when hostname, addresses or versions changed), guarded by a compare that our lease still
//! holds `alive`. Skipped with a warning while the store is away. Also pings the systemd
//! watchdog and triggers the reactors' resync.
//!
//! Liveness is the lease, refreshed by its own task: a slow tick never costs the lease.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use debvisor_objects::node::{Health, NodeInfo, VmCounts};
use debvisor_objects::schema::{self, NodeField};
use debvisor_objects::{Store, TxnBuilder};
use tracing::{debug, info, warn};

use crate::hostinfo;
use crate::hypervisor::Libvirt;

/// Outcome of one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickOutcome {
    /// Written in one transaction.
    Written,
    /// The compare failed: our lease no longer holds `alive` — re-register.
    NotRegistered,
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
    /// `info` as last written; rewritten when it differs.
    written_info: NodeInfo,
    base_info: NodeInfo,
    outage_since: Option<Instant>,
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
            written_info: written,
            base_info: base,
            outage_since: None,
        }
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
        let health = Health {
            libvirt: libvirt_ok,
            load: hostinfo::load(),
            memory: hostinfo::memory(),
            vms,
            alloc: Default::default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: hostinfo::uptime_s(),
            daemon_uptime_s: self.started.elapsed().as_secs(),
            problems,
        };
        let info = refresh_info(
            &self.base_info,
            version.or_else(|| self.written_info.libvirt_version.clone()),
        );
        let info_changed = info != self.written_info;
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
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
        match self.store.txn(t).await {
            Ok(r) if r.succeeded() => {
                if let Some(since) = self.outage_since.take() {
                    info!(node = %self.node, outage_ms = since.elapsed().as_millis() as u64, "store reachable again; keepalive resumed");
                }
                if info_changed {
                    info!(node = %self.node, hostname = %info.hostname, addresses = ?info.addresses,
                        libvirt_version = ?info.libvirt_version, "node info changed; rewritten");
                    self.written_info = info;
                }
                debug!(node = %self.node, "keepalive written");
                TickOutcome::Written
            }
            Ok(_) => {
                warn!(node = %self.node, lease = format!("{lease:x}"), "keepalive refused: this node's lease no longer holds its alive key");
                TickOutcome::NotRegistered
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
