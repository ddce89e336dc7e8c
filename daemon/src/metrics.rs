//! `GET /metrics`: what this node knows, in the Prometheus/OpenMetrics text format, for the
//! scrapers operators already run (docs/metrics.md lists every series).
//!
//! Nothing is collected for the endpoint: a scrape renders what the daemon already holds —
//! its reactors' caches (this node's `health`, the VMs it owns and the `status` it wrote),
//! the keepalive's domain counters of its last tick, and the reactors' counters. A scrape therefore costs no etcd or libvirt
//! request, and the series follow the keepalive tick.
//!
//! Durations (reconciles, lease renewals, keepalive transactions) are recorded where they
//! happen into fixed-bucket histograms ([`debvisor_objects::histogram`]) and only read here.
//!
//! Cardinality is bounded: node series are a fixed set; VM series are 7 per VM *owned by
//! this node* (labels `vm` and `uuid`), so they scale with the node's own VMs, never with
//! the cluster; VM states, reactor kinds, store operations, Ceph statuses, stages and
//! histogram buckets are closed sets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use debvisor_objects::domain::VmKind;
use debvisor_objects::histogram::{Histogram, HistogramSnapshot};
use debvisor_objects::network::NetworkKind;
use debvisor_objects::node::NodeKind;
use debvisor_objects::reactor::{Kind, Reactor, ReactorStats};
use debvisor_objects::store::StoreMetrics;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::hypervisor::DomainStats;
use crate::reactors::ceph_monitor::CephMonitorView;
use crate::reactors::role::RoleView;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

type Labels = Vec<(String, String)>;
type GaugeF = Family<Labels, Gauge<f64, AtomicU64>>;
type CounterF = Family<Labels, Counter<f64, AtomicU64>>;

/// What a scrape reads: the node's name and the daemon's reactors.
#[derive(Clone)]
pub struct Sources {
    /// This node.
    pub node: String,
    /// Every node (this node's health is in it).
    pub nodes: Arc<Reactor<NodeKind>>,
    /// Every VM (this node's are those it owns).
    pub vms: Arc<Reactor<VmKind>>,
    /// Client networks (for the reactor counters).
    pub networks: Arc<Reactor<NetworkKind>>,
    /// The keepalive's domain counters of its last tick.
    pub stats: Arc<std::sync::Mutex<Vec<DomainStats>>>,
    /// The store's failed requests and the node lease's renewals.
    pub store: Arc<StoreMetrics>,
    /// The keepalive ticks' transaction durations.
    pub keepalive_txn: Arc<Histogram>,
    /// The firewall's drift repairs (`None`: `firewall.enabled` is false).
    pub firewall_repairs: Option<Arc<AtomicU64>>,
    /// The Ceph monitor (`None`: `ceph.enabled` is false).
    pub ceph: Option<CephMonitorView>,
    /// Whether this node is the primary now.
    pub role: RoleView,
}

/// A histogram whose buckets were counted elsewhere (a [`HistogramSnapshot`]), so a scrape
/// renders it as it is instead of observing values again.
#[derive(Debug, Default)]
struct Snapshot(RwLock<Option<HistogramSnapshot>>);

impl Snapshot {
    fn set(&self, h: HistogramSnapshot) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(h);
    }
}

impl TypedMetric for Snapshot {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Snapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = self.0.read().unwrap_or_else(|p| p.into_inner());
        match h.as_ref() {
            Some(h) => encoder.encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type HistF = Family<Labels, Snapshot>;

fn histogram(reg: &mut Registry, name: &str, help: &str) -> HistF {
    let f = HistF::default();
    reg.register(name, help, f.clone());
    f
}

/// The Ceph statuses `debvisor_ceph_health` has a series for (a closed set; anything else
/// sets all of them to 0).
const CEPH_STATUSES: [(&str, &str); 4] = [
    ("HEALTH_OK", "ok"),
    ("HEALTH_WARN", "warn"),
    ("HEALTH_ERR", "err"),
    (
        debvisor_objects::node::CephNodeHealth::UNREACHABLE,
        "unreachable",
    ),
];

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn gauge(reg: &mut Registry, name: &str, help: &str) -> GaugeF {
    let f = GaugeF::default();
    reg.register(name, help, f.clone());
    f
}

fn counter(reg: &mut Registry, name: &str, help: &str) -> CounterF {
    let f = CounterF::default();
    reg.register(name, help, f.clone());
    f
}

/// The VM states a node reports in `vms/<vm>/status` (a closed set: anything else counts
/// as `other`).
const VM_STATES: &[&str] = &[
    "running",
    "starting",
    "stopped",
    "shutting-down",
    "disabled",
    "migrating",
    "fail",
    "invalid",
];

/// The series every reactor has: its counters, its queue and its reconcile durations.
struct ReactorFamilies {
    counters: [CounterF; 4],
    pending: GaugeF,
    durations: HistF,
}

fn reactor_series<K: Kind>(kind: &str, r: &Reactor<K>, f: &ReactorFamilies) {
    let ReactorStats {
        lists,
        events,
        reconciles,
        failures,
        pending,
    } = r.stats();
    let l = labels(&[("kind", kind)]);
    // Counters only go up: set them to the reactor's totals.
    for (fam, v) in f.counters.iter().zip([lists, events, reconciles, failures]) {
        fam.get_or_create(&l).inc_by(v as f64);
    }
    f.pending.get_or_create(&l).set(pending as f64);
    f.durations.get_or_create(&l).set(r.reconcile_durations());
}

/// The series of the daemon's own work: store errors, lease renewals, keepalive
/// transactions, firewall drift, Ceph, startup stages and the role.
fn daemon_series(reg: &mut Registry, s: &Sources) {
    let errors = counter(
        reg,
        "debvisor_store_request_errors",
        "etcd requests that failed or timed out, by operation",
    );
    for (op, n) in s.store.request_errors() {
        errors
            .get_or_create(&labels(&[("op", op)]))
            .inc_by(n as f64);
    }
    let renewals = s.store.lease_renewals.snapshot();
    counter(
        reg,
        "debvisor_lease_renewals",
        "Renewals of the node lease etcd answered",
    )
    .get_or_create(&Vec::new())
    .inc_by(renewals.count as f64);
    counter(
        reg,
        "debvisor_lease_renewal_failures",
        "Renewals of the node lease that failed (no answer, timeout, lease gone)",
    )
    .get_or_create(&Vec::new())
    .inc_by(s.store.lease_renewal_failures.load(Ordering::Relaxed) as f64);
    histogram(
        reg,
        "debvisor_lease_renewal_duration_seconds",
        "Time from sending a node lease renewal to its answer",
    )
    .get_or_create(&Vec::new())
    .set(renewals);
    histogram(
        reg,
        "debvisor_keepalive_txn_duration_seconds",
        "Time of the keepalive tick's health/last_seen transaction",
    )
    .get_or_create(&Vec::new())
    .set(s.keepalive_txn.snapshot());
    if let Some(fw) = &s.firewall_repairs {
        counter(
            reg,
            "debvisor_firewall_drift_repairs",
            "Times the firewall sync found table inet debvisor drifted and re-applied it",
        )
        .get_or_create(&Vec::new())
        .inc_by(fw.load(Ordering::Relaxed) as f64);
    }
    if let Some(c) = &s.ceph {
        let health = gauge(
            reg,
            "debvisor_ceph_health",
            "1 for the Ceph status this node saw last (ok, warn, err, unreachable)",
        );
        let status = c.health.borrow().as_ref().map(|h| h.status.clone());
        for (raw, st) in CEPH_STATUSES {
            let on = status.as_deref() == Some(raw);
            health
                .get_or_create(&labels(&[("status", st)]))
                .set(if on { 1.0 } else { 0.0 });
        }
        gauge(
            reg,
            "debvisor_ceph_collection_duration_seconds",
            "Duration of the Ceph monitor's last pass",
        )
        .get_or_create(&Vec::new())
        .set(f64::from_bits(c.last_duration.load(Ordering::Relaxed)));
    }
    let stages = gauge(
        reg,
        "debvisor_stage_duration_seconds",
        "Duration of each startup stage of this process",
    );
    for (stage, secs) in crate::stages::durations() {
        stages
            .get_or_create(&labels(&[("stage", stage.name())]))
            .set(secs);
    }
    gauge(
        reg,
        "debvisor_node_primary",
        "1 while this node is the primary coordinator",
    )
    .get_or_create(&Vec::new())
    .set(if s.role.is_primary() { 1.0 } else { 0.0 });
}

/// Render the whole exposition (OpenMetrics text, ending in `# EOF`).
pub fn render(s: &Sources) -> String {
    let mut reg = Registry::default();
    let load = gauge(
        &mut reg,
        "debvisor_node_load",
        "Load average of the host (period 1m, 5m, 15m)",
    );
    let mem = gauge(
        &mut reg,
        "debvisor_node_memory_bytes",
        "Host memory (kind total, used, free)",
    );
    let libvirt = gauge(
        &mut reg,
        "debvisor_node_libvirt_up",
        "1 when libvirt answered the last health check",
    );
    let uptime = gauge(
        &mut reg,
        "debvisor_daemon_uptime_seconds",
        "Seconds since debvisord started (as of the last keepalive tick)",
    );
    let alive = gauge(
        &mut reg,
        "debvisor_node_alive",
        "1 while this node's liveness key is held (as its cache sees it)",
    );
    let by_state = gauge(
        &mut reg,
        "debvisor_vms",
        "VMs owned by this node by reported state (other: none reported or unknown)",
    );
    let cpu = counter(
        &mut reg,
        "debvisor_vm_cpu_seconds",
        "CPU time used by the VM",
    );
    let vm_mem = gauge(
        &mut reg,
        "debvisor_vm_memory_bytes",
        "Memory of the VM (current balloon size)",
    );
    let vm_vcpus = gauge(&mut reg, "debvisor_vm_vcpus", "vCPUs of the VM");
    let rd = counter(
        &mut reg,
        "debvisor_vm_disk_read_bytes",
        "Bytes read from the VM's disks",
    );
    let wr = counter(
        &mut reg,
        "debvisor_vm_disk_written_bytes",
        "Bytes written to the VM's disks",
    );
    let rx = counter(
        &mut reg,
        "debvisor_vm_network_received_bytes",
        "Bytes received by the VM's interfaces",
    );
    let tx = counter(
        &mut reg,
        "debvisor_vm_network_sent_bytes",
        "Bytes sent by the VM's interfaces",
    );
    let counters = [
        counter(
            &mut reg,
            "debvisor_reactor_lists",
            "Full lists of a watched prefix (1 + relists after a lost watch)",
        ),
        counter(
            &mut reg,
            "debvisor_reactor_events",
            "Watch events applied to the cache",
        ),
        counter(&mut reg, "debvisor_reactor_reconciles", "Reconciles run"),
        counter(
            &mut reg,
            "debvisor_reactor_reconcile_errors",
            "Reconciles that failed (retried with backoff)",
        ),
    ];
    let reactors = ReactorFamilies {
        counters,
        pending: gauge(
            &mut reg,
            "debvisor_reactor_queue_depth",
            "Objects waiting for a reconcile now",
        ),
        durations: histogram(
            &mut reg,
            "debvisor_reactor_reconcile_duration_seconds",
            "Duration of each reconcile (failed ones too)",
        ),
    };
    daemon_series(&mut reg, s);

    if let Some(me) = s.nodes.get(&s.node) {
        if let Ok(n) = &me.parsed {
            alive
                .get_or_create(&Vec::new())
                .set(if n.alive { 1.0 } else { 0.0 });
            if let Some(h) = &n.health {
                for (p, v) in ["1m", "5m", "15m"].iter().zip(h.load) {
                    load.get_or_create(&labels(&[("period", p)])).set(v);
                }
                for (k, mib) in [
                    ("total", h.memory.total_mib),
                    ("used", h.memory.used_mib),
                    ("free", h.memory.free_mib),
                ] {
                    mem.get_or_create(&labels(&[("kind", k)]))
                        .set(mib as f64 * 1024.0 * 1024.0);
                }
                libvirt
                    .get_or_create(&Vec::new())
                    .set(if h.libvirt { 1.0 } else { 0.0 });
                uptime
                    .get_or_create(&Vec::new())
                    .set(h.daemon_uptime_s as f64);
            }
        }
    }
    for st in VM_STATES.iter().chain(["other"].iter()) {
        by_state.get_or_create(&labels(&[("state", st)])).set(0.0);
    }
    let stats: std::collections::HashMap<String, DomainStats> = s
        .stats
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|d| (d.uuid.clone(), d.clone()))
        .collect();
    for (uuid, e) in s.vms.list() {
        let owner = e.keys.get("owner").map(|k| k.value.as_slice());
        if owner != Some(s.node.as_bytes()) {
            continue;
        }
        let status: Value = e
            .keys
            .get("status")
            .and_then(|k| serde_json::from_slice(&k.value).ok())
            .unwrap_or(Value::Null);
        let st = status["state"]
            .as_str()
            .filter(|st| VM_STATES.contains(st))
            .unwrap_or("other");
        by_state.get_or_create(&labels(&[("state", st)])).inc();
        let Some(st) = stats.get(uuid.as_str()) else {
            continue;
        };
        let name = match &e.parsed {
            Ok(vm) => vm.name.clone(),
            Err(_) => st.name.clone(),
        };
        let l = labels(&[("vm", &name), ("uuid", &uuid)]);
        cpu.get_or_create(&l).inc_by(st.cpu_time_ns as f64 / 1e9);
        vm_mem.get_or_create(&l).set(st.memory_kib as f64 * 1024.0);
        vm_vcpus.get_or_create(&l).set(f64::from(st.vcpus));
        rd.get_or_create(&l).inc_by(st.block_rd_bytes as f64);
        wr.get_or_create(&l).inc_by(st.block_wr_bytes as f64);
        rx.get_or_create(&l).inc_by(st.net_rx_bytes as f64);
        tx.get_or_create(&l).inc_by(st.net_tx_bytes as f64);
    }
    reactor_series("node", &s.nodes, &reactors);
    reactor_series("vm", &s.vms, &reactors);
    reactor_series("network", &s.networks, &reactors);
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &reg) {
        warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// The media type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serve `GET /metrics` on `listen` until `cancel`. A port that cannot be bound is logged
/// and the daemon goes on without the endpoint (metrics are never worth a node).
pub async fn serve(listen: SocketAddr, sources: Sources, cancel: CancellationToken) {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            warn!(node = %sources.node, address = %listen, error = %e, "cannot serve /metrics; going on without it");
            return;
        }
    };
    info!(node = %sources.node, address = %listen, "serving /metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let s = sources.clone();
            async move {
                let body = tokio::task::spawn_blocking(move || render(&s))
                    .await
                    .unwrap_or_default();
                ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], body)
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        warn!(address = %listen, error = %e, "/metrics server stopped");
    }
}
