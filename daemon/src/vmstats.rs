//! Per-VM stats, sampled in their own task on `domains.stats_sample_interval` (and soon
//! after a libvirt domain event), never in the keepalive tick: the keepalive's transaction
//! (and the lease, which has its own task anyway) never waits on libvirt's bulk stats.
//!
//! One sample is one `virConnectGetAllDomainStats` call. From it:
//! - the node's allocation (`health.alloc`), which the keepalive reads from a channel;
//! - every domain's counters for `/metrics` (which never asks libvirt on a scrape);
//! - the `vmstats/<uuid>` records of the VMs this node manages, written only when
//!   [`write_due`] says so. The key is outside `vms/`, so no node's VM watch receives it.
//!
//! # etcd history
//!
//! A record holds what placement and an operator need (running or not, CPU % of one core,
//! memory, vCPUs), not counters, so an idle VM's record does not change. It is written at
//! the first sample of a VM on this node; at the next sample when its running state, vCPUs
//! or maximum memory change; and when CPU moved by at least [`CPU_DEADBAND_PCT`] points or
//! memory by at least max([`MEMORY_DEADBAND_MIB`], 1/[`MEMORY_DEADBAND_DIV`] of the
//! maximum) since the last write, but no sooner than `stats_write_interval` after it.
//! Per node and hour, with the keepalive interval `T`, `L` lifecycle changes in the hour (a
//! start counts twice: the start, then its first CPU rate one sample later),
//! `B` VMs whose load swings beyond the deadband and the write interval `W`:
//!
//! ```text
//! versions/h = 2 · 3600 / T  (+1 per info change)  +  L  +  ≤ B · 3600 / W
//! ```
//!
//! With N idle VMs that is `2 · 3600 / T` (1440 at 5 s) whatever N, after one write per
//! VM; each VM that keeps swinging adds at most `3600 / W` (12 at 5 min). At most
//! `domains.stats_writes_per_tick` records go out per sample (new and lifecycle changes
//! first, then the stalest); the rest wait for the next sample.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use debvisor_objects::domain::{self, VmField, VmStats};
use debvisor_objects::node::Allocation;
use debvisor_objects::schema::{self, NodeField};
use debvisor_objects::{Store, TxnBuilder};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::hypervisor::{DomainStats, Libvirt};
use crate::reactors::domain::DomainHost;

/// CPU deadband: points of one core (a VM between 3 % and 12 % is not rewritten).
pub const CPU_DEADBAND_PCT: u32 = 10;
/// Memory deadband floor, MiB.
pub const MEMORY_DEADBAND_MIB: u64 = 64;
/// Memory deadband as a fraction of the maximum memory (1/20 = 5 %).
pub const MEMORY_DEADBAND_DIV: u64 = 20;
/// Shortest time between two samples triggered by domain events (a burst of starts is
/// sampled about once a second, not once per event).
const EVENT_SAMPLE_GAP: Duration = Duration::from_secs(1);
/// Most operations per transaction (etcd's default `--max-txn-ops` is 128).
const TXN_OPS: usize = 100;

/// Why a VM's record is written this sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Due {
    /// Never written by this node (new here, or after a restart with nothing to read).
    First,
    /// Running state, vCPUs or maximum memory changed, or a started VM's first CPU rate:
    /// written at the next sample.
    Lifecycle,
    /// CPU or memory moved beyond the deadband and the last write is old enough.
    Drift,
}

/// When a VM's record is due: `last` is the record this node last wrote and its age.
/// Pure: the whole write policy of `vmstats/` (the `at` and `node` fields never count).
pub fn write_due(
    last: Option<(&VmStats, Duration)>,
    now: &VmStats,
    write_interval: Duration,
) -> Option<Due> {
    let Some((old, age)) = last else {
        return Some(Due::First);
    };
    // A running VM's first CPU rate counts as a lifecycle change: its start was written
    // before a rate could be known, and an idle VM would otherwise never move past the
    // deadband to replace "not sampled yet" (one more write per start).
    let first_rate = now.active && old.cpu_pct.is_none() && now.cpu_pct.is_some();
    if old.active != now.active
        || old.vcpus != now.vcpus
        || old.max_memory_kib != now.max_memory_kib
        || first_rate
    {
        return Some(Due::Lifecycle);
    }
    let cpu = old.cpu_pct.unwrap_or(0).abs_diff(now.cpu_pct.unwrap_or(0));
    let mem_band_kib = (MEMORY_DEADBAND_MIB * 1024).max(now.max_memory_kib / MEMORY_DEADBAND_DIV);
    let mem = old.memory_kib.abs_diff(now.memory_kib);
    let moved = cpu >= CPU_DEADBAND_PCT || mem >= mem_band_kib;
    (moved && age >= write_interval).then_some(Due::Drift)
}

/// CPU use between two samples, percent of one core (rounded down); `None` without a
/// previous sample or with the counter gone back (domain restarted).
pub fn cpu_pct(prev: Option<(u64, Instant)>, now_ns: u64, now: Instant) -> Option<u32> {
    let (ns, at) = prev?;
    let wall = now.checked_duration_since(at)?.as_nanos();
    let used = u128::from(now_ns.checked_sub(ns)?);
    if wall == 0 {
        return None;
    }
    u32::try_from(used * 100 / wall).ok()
}

/// What the domains on this host take from it.
pub fn allocation(stats: &[DomainStats]) -> Allocation {
    let mut a = Allocation::default();
    for s in stats {
        a.memory_provisioned_mib += s.max_memory_kib / 1024;
        a.vcpus_provisioned += s.vcpus;
        if s.active {
            a.memory_mib += s.memory_kib / 1024;
            a.vcpus += s.vcpus;
        }
    }
    a
}

/// The latest sample as the keepalive reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// At least one sample was taken (the keepalive's first tick waits for it).
    pub sampled: bool,
    /// Allocation of the last successful sample.
    pub allocation: Allocation,
    /// The last sample's error (a `problems` line), `None` when it worked.
    pub error: Option<String>,
}

/// The sampler's outputs, for the keepalive (summary) and `/metrics` (counters).
#[derive(Clone)]
pub struct StatsView {
    /// Latest summary.
    pub summary: watch::Receiver<Summary>,
    /// Every domain's counters as of the last sample.
    pub counters: Arc<Mutex<Vec<DomainStats>>>,
}

/// Settings of the sampler (from `domains.*`).
#[derive(Debug, Clone, Copy)]
pub struct SamplerConfig {
    /// `domains.stats_sample_interval`.
    pub sample_interval: Duration,
    /// `domains.stats_write_interval`.
    pub write_interval: Duration,
    /// `domains.stats_writes_per_tick`: most records per sample.
    pub budget: usize,
}

/// The sampling task's state.
pub struct Sampler {
    store: Store,
    node: String,
    lease: Arc<AtomicI64>,
    libvirt: Libvirt,
    domains: Arc<DomainHost>,
    cfg: SamplerConfig,
    /// Per domain: CPU time and instant of the previous sample.
    prev_cpu: HashMap<String, (u64, Instant)>,
    /// Per managed VM: the record last written (or read back at start) and when.
    written: HashMap<String, (VmStats, Instant)>,
    /// The records this node wrote before a restart were read back.
    seeded: bool,
    summary: watch::Sender<Summary>,
    counters: Arc<Mutex<Vec<DomainStats>>>,
    /// The previous sample failed (the recovery is logged once).
    failing: bool,
}

impl Sampler {
    /// A sampler for `node`'s domains and the view the keepalive and `/metrics` read.
    pub fn new(
        store: Store,
        node: String,
        lease: Arc<AtomicI64>,
        libvirt: Libvirt,
        domains: Arc<DomainHost>,
        cfg: SamplerConfig,
    ) -> (Sampler, StatsView) {
        let (tx, rx) = watch::channel(Summary::default());
        let counters: Arc<Mutex<Vec<DomainStats>>> = Arc::default();
        let s = Sampler {
            store,
            node,
            lease,
            libvirt,
            domains,
            cfg: SamplerConfig {
                budget: cfg.budget.max(1),
                ..cfg
            },
            prev_cpu: HashMap::new(),
            written: HashMap::new(),
            seeded: false,
            summary: tx,
            counters: counters.clone(),
            failing: false,
        };
        (
            s,
            StatsView {
                summary: rx,
                counters,
            },
        )
    }

    /// Sample at once, then every `sample_interval` and soon after `changed` fires, until
    /// `cancel`.
    pub fn spawn(mut self, changed: Arc<Notify>, cancel: CancellationToken) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.cfg.sample_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                    _ = changed.notified() => {
                        // Coalesce a burst of events into one sample.
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(EVENT_SAMPLE_GAP) => {}
                        }
                        tick.reset();
                    }
                }
                self.sample().await;
            }
        });
    }

    /// Read back the records this node wrote before a restart, so unchanged VMs are not
    /// rewritten. On failure nothing is seeded (every VM is written once).
    async fn seed(&mut self) {
        self.seeded = true;
        match self.store.list(domain::VMSTATS_PREFIX).await {
            Ok((kvs, _)) => {
                let now = Instant::now();
                for kv in kvs {
                    let Some(uuid) = kv.key.strip_prefix(domain::VMSTATS_PREFIX) else {
                        continue;
                    };
                    if let Ok(v) = serde_json::from_slice::<VmStats>(&kv.value) {
                        if v.node == self.node {
                            self.written.insert(uuid.to_string(), (v, now));
                        }
                    }
                }
            }
            Err(e) => {
                debug!(node = %self.node, error = %e, "vmstats records not read back; every VM is written once");
            }
        }
    }

    /// One sample: libvirt's bulk stats, the summary and counters, the due records.
    pub async fn sample(&mut self) {
        let stats = match self.libvirt.all_stats().await {
            Ok(s) => s,
            Err(e) => {
                if !self.failing {
                    warn!(node = %self.node, error = %e, "domain stats sample failed; allocation and per-VM stats keep their last values");
                }
                self.failing = true;
                let error = Some(e.to_string());
                self.summary.send_modify(|s| {
                    s.sampled = true;
                    s.error = error;
                });
                return;
            }
        };
        if std::mem::take(&mut self.failing) {
            info!(node = %self.node, "domain stats sampled again");
        }
        if !self.seeded {
            self.seed().await;
        }
        let now = Instant::now();
        let at = crate::hostinfo::now_rfc3339();
        let managed = self.domains.managed();
        let mut due: Vec<(Due, Option<Instant>, VmStats, usize)> = Vec::new();
        for (i, s) in stats.iter().enumerate() {
            let prev = match self.prev_cpu.get_mut(&s.uuid) {
                Some(p) => Some(std::mem::replace(p, (s.cpu_time_ns, now))),
                None => {
                    self.prev_cpu.insert(s.uuid.clone(), (s.cpu_time_ns, now));
                    None
                }
            };
            if !managed.contains(&s.uuid) {
                continue;
            }
            let rec = VmStats {
                node: self.node.clone(),
                active: s.active,
                cpu_pct: if s.active {
                    cpu_pct(prev, s.cpu_time_ns, now)
                } else {
                    None
                },
                memory_kib: s.memory_kib,
                max_memory_kib: s.max_memory_kib,
                vcpus: s.vcpus,
                at: String::new(),
            };
            let last = self.written.get(&s.uuid);
            if let Some(why) = write_due(
                last.map(|(v, t)| (v, now.saturating_duration_since(*t))),
                &rec,
                self.cfg.write_interval,
            ) {
                due.push((why, last.map(|(_, t)| *t), rec, i));
            }
        }
        // Forget what is gone from the host or no longer ours (written again if it returns).
        let live: HashSet<&str> = stats.iter().map(|s| s.uuid.as_str()).collect();
        self.prev_cpu.retain(|u, _| live.contains(u.as_str()));
        self.written
            .retain(|u, _| live.contains(u.as_str()) && managed.contains(u));
        due.sort_by_key(|(why, last, _, _)| (*why, *last));
        due.truncate(self.cfg.budget);
        if !due.is_empty() {
            self.write(due, &stats, &at).await;
        }
        let allocation = allocation(&stats);
        self.summary.send_modify(|s| {
            s.sampled = true;
            s.allocation = allocation;
            s.error = None;
        });
        *self.counters.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    /// Write the due records in batches, each guarded by this node's lease holding its
    /// `alive` key (a node that lost its registration writes nothing) and by every VM's
    /// `xml` still existing (a record never outlives its VM's removal). A batch refused
    /// for one removed VM is retried one record at a time. A first write also deletes the
    /// legacy `vms/<uuid>/stats` key of earlier versions.
    async fn write(
        &mut self,
        due: Vec<(Due, Option<Instant>, VmStats, usize)>,
        stats: &[DomainStats],
        at: &str,
    ) {
        let records: Vec<(Due, String, VmStats)> = due
            .into_iter()
            .map(|(why, _, mut rec, i)| {
                rec.at = at.to_string();
                (why, stats[i].uuid.clone(), rec)
            })
            .collect();
        // Each record takes up to 3 operations: the put, the guard and the legacy delete.
        for batch in records.chunks(TXN_OPS / 3) {
            match self.write_batch(batch).await {
                Some(true) => {}
                Some(false) if batch.len() > 1 => {
                    for one in batch {
                        if self.write_batch(std::slice::from_ref(one)).await.is_none() {
                            return;
                        }
                    }
                }
                Some(false) => {}
                None => return,
            }
        }
    }

    /// One guarded transaction: `Some(true)` written, `Some(false)` a compare failed,
    /// `None` the store did not answer.
    async fn write_batch(&mut self, batch: &[(Due, String, VmStats)]) -> Option<bool> {
        let lease = self.lease.load(Ordering::SeqCst);
        let alive = schema::node_key(&self.node, NodeField::Alive);
        let mut t = TxnBuilder::new().lease_is(&alive, lease);
        for (why, uuid, rec) in batch {
            t = t.present(&domain::vm_key(uuid, VmField::Xml)).put(
                &domain::vm_stats_key(uuid),
                serde_json::to_vec(rec).unwrap_or_default(),
            );
            if *why == Due::First {
                t = t.delete(&domain::vm_key(uuid, VmField::Stats));
            }
        }
        match self.store.txn(t).await {
            Ok(r) if r.succeeded() => {
                let now = Instant::now();
                debug!(node = %self.node, records = batch.len(), "vmstats written");
                for (_, uuid, rec) in batch {
                    self.written.insert(uuid.clone(), (rec.clone(), now));
                }
                Some(true)
            }
            Ok(_) => {
                debug!(node = %self.node, lease = format!("{lease:x}"), records = batch.len(),
                    "vmstats not written: this node's lease no longer holds its alive key, or a VM was removed");
                Some(false)
            }
            Err(e) => {
                debug!(node = %self.node, error = %e, "vmstats not written: store unreachable");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(active: bool, cpu: Option<u32>, mem_mib: u64, max_mib: u64, vcpus: u32) -> VmStats {
        VmStats {
            node: "n1".into(),
            active,
            cpu_pct: cpu,
            memory_kib: mem_mib * 1024,
            max_memory_kib: max_mib * 1024,
            vcpus,
            at: "2026-12-06T00:00:00Z".into(),
        }
    }

    const W: Duration = Duration::from_secs(300);
    const YOUNG: Duration = Duration::from_secs(10);

    #[test]
    fn a_vm_is_written_once_and_then_only_when_it_moves() {
        let r = rec(true, Some(3), 1024, 1024, 2);
        assert_eq!(write_due(None, &r, W), Some(Due::First));
        // Identical, or the same but sampled at another time: never again.
        let mut later = r.clone();
        later.at = "2026-12-06T01:00:00Z".into();
        assert_eq!(write_due(Some((&r, YOUNG)), &later, W), None);
        assert_eq!(
            write_due(Some((&r, Duration::from_secs(86_400))), &later, W),
            None
        );
    }

    #[test]
    fn lifecycle_changes_are_written_at_once() {
        let r = rec(true, Some(3), 1024, 1024, 2);
        for changed in [
            rec(false, None, 1024, 1024, 2),
            rec(true, Some(3), 1024, 1024, 4),
            rec(true, Some(3), 1024, 2048, 2),
        ] {
            assert_eq!(
                write_due(Some((&r, Duration::ZERO)), &changed, W),
                Some(Due::Lifecycle),
                "{changed:?}"
            );
        }
    }

    #[test]
    fn a_started_vms_first_cpu_rate_is_written_at_once() {
        let started = rec(true, None, 1024, 1024, 2);
        let idle = rec(true, Some(0), 1024, 1024, 2);
        assert_eq!(
            write_due(Some((&started, YOUNG)), &idle, W),
            Some(Due::Lifecycle)
        );
        // Once known, an idle VM stays written as it is.
        assert_eq!(write_due(Some((&idle, YOUNG)), &idle, W), None);
        // A stopped VM has no rate to wait for.
        let off = rec(false, None, 1024, 1024, 2);
        assert_eq!(write_due(Some((&off, YOUNG)), &off, W), None);
    }

    #[test]
    fn cpu_within_the_deadband_is_never_written() {
        let r = rec(true, Some(3), 1024, 1024, 2);
        let old = Duration::from_secs(86_400);
        assert_eq!(
            write_due(Some((&r, old)), &rec(true, Some(12), 1024, 1024, 2), W),
            None
        );
        assert_eq!(
            write_due(Some((&r, old)), &rec(true, Some(0), 1024, 1024, 2), W),
            None
        );
    }

    #[test]
    fn drift_beyond_the_deadband_waits_for_the_write_interval() {
        let r = rec(true, Some(3), 1024, 1024, 2);
        let busy = rec(true, Some(13), 1024, 1024, 2);
        assert_eq!(write_due(Some((&r, YOUNG)), &busy, W), None);
        assert_eq!(
            write_due(Some((&r, W - Duration::from_millis(1))), &busy, W),
            None
        );
        assert_eq!(write_due(Some((&r, W)), &busy, W), Some(Due::Drift));
    }

    #[test]
    fn memory_deadband_is_the_larger_of_64_mib_and_5_percent() {
        // 1 GiB maximum: 64 MiB band (5 % would be 51 MiB).
        let small = rec(true, Some(0), 1000, 1024, 1);
        assert_eq!(
            write_due(Some((&small, W)), &rec(true, Some(0), 1063, 1024, 1), W),
            None
        );
        assert_eq!(
            write_due(Some((&small, W)), &rec(true, Some(0), 1064, 1024, 1), W),
            Some(Due::Drift)
        );
        // 16 GiB maximum: 5 % = 819 MiB.
        let big = rec(true, Some(0), 8000, 16384, 4);
        assert_eq!(
            write_due(Some((&big, W)), &rec(true, Some(0), 8800, 16384, 4), W),
            None
        );
        assert_eq!(
            write_due(Some((&big, W)), &rec(true, Some(0), 8820, 16384, 4), W),
            Some(Due::Drift)
        );
    }

    #[test]
    fn first_and_lifecycle_writes_go_before_drift() {
        let t = Instant::now();
        let mut due = [
            (Due::Drift, Some(t), 0),
            (Due::First, None, 1),
            (Due::Lifecycle, Some(t), 2),
        ];
        due.sort_by_key(|(why, last, _)| (*why, *last));
        assert_eq!(due.map(|d| d.2), [1, 2, 0]);
    }

    #[test]
    fn cpu_percent_of_one_core() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(10);
        // 2.5 s of CPU in 10 s: 25 %; 4 cores busy: 400 %.
        assert_eq!(
            cpu_pct(Some((1_000, t0)), 1_000 + 2_500_000_000, t1),
            Some(25)
        );
        assert_eq!(cpu_pct(Some((0, t0)), 40_000_000_000, t1), Some(400));
        assert_eq!(cpu_pct(None, 5, t1), None);
        // Counter went back (domain restarted) or no time passed.
        assert_eq!(cpu_pct(Some((10, t0)), 5, t1), None);
        assert_eq!(cpu_pct(Some((0, t1)), 5, t1), None);
    }

    #[test]
    fn allocation_counts_running_and_defined() {
        let d = |active, mem, max, vcpus| DomainStats {
            uuid: String::new(),
            name: String::new(),
            active,
            cpu_time_ns: 0,
            memory_kib: mem,
            max_memory_kib: max,
            vcpus,
            block_rd_bytes: 0,
            block_wr_bytes: 0,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
        };
        let a = allocation(&[
            d(true, 512 * 1024, 1024 * 1024, 2),
            d(false, 0, 2048 * 1024, 4),
        ]);
        assert_eq!(
            (
                a.memory_mib,
                a.memory_provisioned_mib,
                a.vcpus,
                a.vcpus_provisioned
            ),
            (512, 3072, 2, 6)
        );
    }
}
