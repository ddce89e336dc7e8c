//! `GET /metrics`: what this node knows, in the Prometheus/OpenMetrics text format, for the
//! scrapers operators already run (docs/metrics.md lists every series).
//!
//! Nothing is collected for the endpoint: a scrape renders what the daemon already holds —
//! its reactors' caches (this node's `health`, the VMs it owns and the `status` it wrote),
//! the keepalive's domain counters of its last tick, and the reactors' counters. A scrape therefore costs no etcd or libvirt
//! request, and the series follow the keepalive tick.
//!
//! Cardinality is bounded: node series are a fixed set; VM series are 7 per VM *owned by
//! this node* (labels `vm` and `uuid`), so they scale with the node's own VMs, never with
//! the cluster; VM states and reactor kinds are closed sets.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use debvisor_objects::domain::VmKind;
use debvisor_objects::network::NetworkKind;
use debvisor_objects::node::NodeKind;
use debvisor_objects::reactor::{Kind, Reactor, ReactorStats};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::hypervisor::DomainStats;
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
}

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

fn reactor_series<K: Kind>(kind: &str, r: &Reactor<K>, f: &[CounterF; 4]) {
    let ReactorStats {
        lists,
        events,
        reconciles,
        failures,
    } = r.stats();
    let l = labels(&[("kind", kind)]);
    // Counters only go up: set them to the reactor's totals.
    for (fam, v) in f.iter().zip([lists, events, reconciles, failures]) {
        fam.get_or_create(&l).inc_by(v as f64);
    }
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
    let reactors = [
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
