//! The generic reactor against a real etcd: initial sync, watch, compaction → relist,
//! per-object errors, no concurrent reconciles of one object, coalescing and retries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use debvisor_objects::node::{DaemonState, NodeKind, NodeReconciler};
use debvisor_objects::{
    Action, Entry, Kind, Reactor, ReactorOptions, ReconcileError, Reconciler, Store, StoreOptions,
};
use debvisor_tests::etcd::store_options;
use debvisor_tests::{DaemonBuilder, EtcdProcess, TcpProxy};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn options(endpoint: String) -> StoreOptions {
    store_options(endpoint, Duration::from_secs(2))
}

async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + within;
    while !f() {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_the_watch_relists_and_drops_the_deleted_object() {
    let etcd = EtcdProcess::start().expect("etcd");
    let direct = Store::connect(&options(etcd.endpoint()))
        .await
        .expect("store");
    direct
        .put("nodes/keep/daemon_state", "run")
        .await
        .expect("put");
    direct
        .put("nodes/gone/daemon_state", "run")
        .await
        .expect("put");

    // The reactor talks to etcd through a proxy we can cut.
    let proxy = TcpProxy::start(etcd.client_addr()).expect("proxy");
    let via = Store::connect(&options(proxy.endpoint()))
        .await
        .expect("store via proxy");
    let view = Reactor::spawn(
        NodeKind,
        NodeReconciler::default(),
        via,
        ReactorOptions::default(),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(10), view.wait_synced())
        .await
        .expect("initial sync");
    assert!(view.get("gone").is_some() && view.get("keep").is_some());
    let lists_before = view.stats().lists;

    // While the reactor cannot see etcd: delete an object, write more, compact past it all.
    proxy.cut().expect("cut");
    direct
        .delete("nodes/gone/daemon_state")
        .await
        .expect("delete");
    direct
        .put("nodes/keep/daemon_state", "init")
        .await
        .expect("put");
    let rev = direct.probe().await.expect("rev");
    direct.compact(rev).await.expect("compact");
    proxy.restore();

    // The watch from the old revision is compacted: relist, and the missing object is dropped.
    eventually(
        "relist drops the deleted object",
        Duration::from_secs(20),
        || {
            view.get("gone").is_none()
                && view
                    .get("keep")
                    .map(|e| {
                        e.parsed
                            .as_ref()
                            .map(|n| n.daemon_state == Some(DaemonState::Init))
                            .unwrap_or(false)
                    })
                    .unwrap_or(false)
        },
    )
    .await;
    assert!(view.stats().lists > lists_before, "a relist happened");
    view.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_value_marks_only_that_node_invalid() {
    let etcd = EtcdProcess::start().expect("etcd");
    let store = Store::connect(&options(etcd.endpoint()))
        .await
        .expect("store");
    store
        .put("nodes/good/daemon_state", "run")
        .await
        .expect("put");
    store
        .put("nodes/bad/daemon_state", "run")
        .await
        .expect("put");
    let view = Reactor::spawn(
        NodeKind,
        NodeReconciler::default(),
        store.clone(),
        ReactorOptions::default(),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(10), view.wait_synced())
        .await
        .expect("sync");

    store.put("nodes/bad/info", "{not json").await.expect("put");
    store
        .put("nodes/bad/domain_state", "sideways")
        .await
        .expect("put");
    eventually("bad node marked invalid", Duration::from_secs(10), || {
        view.get("bad").map(|e| e.parsed.is_err()).unwrap_or(false)
    })
    .await;
    let err = view
        .get("bad")
        .and_then(|e| e.parsed.as_ref().err().cloned())
        .expect("error");
    assert!(err.field == "info" || err.field == "domain_state", "{err}");
    // The good node is untouched and still follows changes.
    store
        .put("nodes/good/daemon_state", "shutdown")
        .await
        .expect("put");
    eventually("good node follows", Duration::from_secs(10), || {
        view.get("good")
            .and_then(|e| e.parsed.as_ref().ok().cloned())
            .map(|n| n.daemon_state == Some(DaemonState::Shutdown))
            .unwrap_or(false)
    })
    .await;
    // Repairing the values makes the node valid again.
    store
        .put(
            "nodes/bad/info",
            serde_json::to_vec(&debvisor_objects::node::NodeInfo::default()).unwrap_or_default(),
        )
        .await
        .expect("put");
    store
        .put("nodes/bad/domain_state", "ready")
        .await
        .expect("put");
    eventually("bad node repaired", Duration::from_secs(10), || {
        view.get("bad").map(|e| e.parsed.is_ok()).unwrap_or(false)
    })
    .await;
    view.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_carries_on_when_another_node_has_garbage() {
    let etcd = EtcdProcess::start().expect("etcd");
    let store = Store::connect(&options(etcd.endpoint()))
        .await
        .expect("store");
    store
        .put("nodes/garbage/daemon_state", "¯\\_(ツ)_/¯")
        .await
        .expect("put");
    let mut d = DaemonBuilder::new("steady")
        .endpoints(&[etcd.endpoint()])
        .spawn()
        .expect("spawn");
    let warn = d
        .wait_for(
            |v| {
                v.get("node").and_then(Value::as_str) == Some("garbage") && v.get("field").is_some()
            },
            Duration::from_secs(30),
        )
        .expect("invalid node reported");
    assert_eq!(
        warn.get("field").and_then(Value::as_str),
        Some("daemon_state")
    );
    assert_eq!(warn.get("level").and_then(Value::as_str), Some("WARN"));
    d.wait_for(
        |v| v.get("stage").and_then(Value::as_str) == Some("keepalive"),
        Duration::from_secs(30),
    )
    .expect("run");
    // Garbage arriving later is reported too, and the daemon keeps ticking.
    store
        .put("nodes/other/health", "[1,2,3]")
        .await
        .expect("put");
    d.wait_for(
        |v| {
            v.get("node").and_then(Value::as_str) == Some("other")
                && v.get("field").and_then(Value::as_str) == Some("health")
        },
        Duration::from_secs(10),
    )
    .expect("later garbage reported");
    let rev0 = store
        .get("nodes/steady/last_seen")
        .await
        .expect("get")
        .map(|kv| kv.mod_revision)
        .unwrap_or(0);
    eventually("keepalive continues", Duration::from_secs(10), || {
        futures::executor::block_on(store.get("nodes/steady/last_seen"))
            .ok()
            .flatten()
            .map(|kv| kv.mod_revision > rev0)
            .unwrap_or(false)
    })
    .await;
    assert!(d.is_running());
}

/// A probe reconciler: slow, counts concurrency per object, fails the first N times on demand.
#[derive(Default, Clone)]
struct Probe {
    inflight: Arc<Mutex<HashMap<String, usize>>>,
    max_inflight: Arc<AtomicUsize>,
    runs: Arc<Mutex<HashMap<String, usize>>>,
    last_seen: Arc<Mutex<HashMap<String, Option<String>>>>,
    fail_first: Arc<AtomicUsize>,
}

impl Reconciler<NodeKind> for Probe {
    async fn reconcile(
        &self,
        id: &str,
        entry: Option<Arc<Entry<<NodeKind as Kind>::Object>>>,
    ) -> Result<Action, ReconcileError> {
        let now = {
            let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(id.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        self.max_inflight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        *self
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_insert(0) += 1;
        let value = entry.and_then(|e| {
            e.keys
                .get("config/version")
                .map(|k| String::from_utf8_lossy(&k.value).into_owned())
        });
        self.last_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), value);
        if let Some(n) = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)
        {
            *n -= 1;
        }
        if self.fail_first.load(Ordering::SeqCst) > 0 {
            self.fail_first.fetch_sub(1, Ordering::SeqCst);
            return Err(ReconcileError::Host("injected failure".into()));
        }
        Ok(Action::AwaitChange)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_coalesce_and_one_object_never_reconciles_twice_at_once() {
    let etcd = EtcdProcess::start().expect("etcd");
    let store = Store::connect(&options(etcd.endpoint()))
        .await
        .expect("store");
    let probe = Probe::default();
    let view = Reactor::spawn(
        NodeKind,
        probe.clone(),
        store.clone(),
        ReactorOptions {
            workers: 4,
            ..Default::default()
        },
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(10), view.wait_synced())
        .await
        .expect("sync (empty)");

    // 100 writes to one object as fast as etcd takes them, and a few to others.
    for i in 0..100 {
        store
            .put("nodes/hot/config/version", format!("v{i}"))
            .await
            .expect("put");
        if i % 25 == 0 {
            store
                .put(&format!("nodes/cold{i}/config/version"), "x")
                .await
                .expect("put");
        }
    }
    eventually(
        "the last value is reconciled",
        Duration::from_secs(20),
        || {
            probe
                .last_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get("hot")
                .cloned()
                .flatten()
                .as_deref()
                == Some("v99")
        },
    )
    .await;
    let runs = probe
        .runs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get("hot")
        .copied()
        .unwrap_or(0);
    assert_eq!(
        probe.max_inflight.load(Ordering::SeqCst),
        1,
        "never two reconciles of one object at once"
    );
    assert!(
        runs < 100,
        "bursts coalesce: {runs} reconciles for 100 writes"
    );
    assert!(view.stats().events >= 100);

    // Failures retry with backoff until success.
    probe.fail_first.store(2, Ordering::SeqCst);
    store
        .put("nodes/flaky/config/version", "1")
        .await
        .expect("put");
    eventually("retried to success", Duration::from_secs(20), || {
        probe.fail_first.load(Ordering::SeqCst) == 0
            && probe
                .runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get("flaky")
                .copied()
                .unwrap_or(0)
                >= 3
    })
    .await;
    assert!(view.stats().failures >= 2);

    // Resync enqueues every object once more.
    let total_before: usize = probe
        .runs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .sum();
    view.resync();
    let n = view.list().len();
    eventually(
        "resync reconciles every object",
        Duration::from_secs(20),
        || {
            let total: usize = probe
                .runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .sum();
            total >= total_before + n
        },
    )
    .await;
    view.shutdown().await;
}
