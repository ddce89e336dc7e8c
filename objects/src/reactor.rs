//! The generic reactor: for one key prefix, a watcher keeps a cache of objects current and a
//! controller reconciles each changed object — kube-runtime's watcher → reflector →
//! controller, on etcd.
//!
//! * Initial list at revision R, then watch from R+1. Any break of the watch (compaction,
//!   reconnect, server restart) leads to a relist; objects missing from the relist are
//!   treated as deleted.
//! * Each object is parsed from all of its keys; a bad value marks that object in error and
//!   nothing else (the reconciler still sees it, to report it).
//! * A work queue that never runs two reconciles of one object at once and coalesces bursts:
//!   a change during a reconcile schedules exactly one more run.
//! * Failures retry with exponential backoff and jitter; `RequeueAfter` schedules a check.
//! * `resync()` (on the keepalive tick) enqueues every object to catch host drift.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::histogram::{Histogram, HistogramSnapshot};
use crate::store::{Kv, Store, StoreError};

/// One raw key of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// Raw value.
    pub value: Vec<u8>,
    /// Revision of its last change.
    pub mod_revision: i64,
    /// Lease it is bound to (0 = none).
    pub lease: i64,
}

/// Why an object could not be parsed: the field (key suffix or JSON path) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ObjectError {
    /// Field path, e.g. `info.memory_mib` or `daemon_state`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ObjectError {
    /// Shorthand constructor.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ObjectError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The keys of one object (relative to `<prefix><id>/`) and what they parse to.
#[derive(Debug)]
pub struct Entry<O> {
    /// Raw keys below the object's prefix (`info`, `info/fqdn`, …).
    pub keys: BTreeMap<String, KeyEntry>,
    /// The parsed object, or why it is invalid.
    pub parsed: Result<Arc<O>, ObjectError>,
}

/// An object kind: which prefix it lives under and how its keys become an object.
pub trait Kind: Send + Sync + 'static {
    /// The parsed object.
    type Object: Send + Sync + fmt::Debug + 'static;
    /// Short name for log lines (`node`, `vm`, `network`).
    const NAME: &'static str;
    /// Relative prefix of all objects of this kind, with a trailing slash (`nodes/`).
    fn prefix(&self) -> &str;
    /// Parse the keys of object `id`. Called on every change of any of its keys.
    fn parse(
        &self,
        id: &str,
        keys: &BTreeMap<String, KeyEntry>,
    ) -> Result<Self::Object, ObjectError>;
    /// Does a key below the object (`info`, `status/n1`, …) belong to its desired state?
    /// Keys that do not (status and reports written by the reconcilers themselves) are not
    /// cached and their changes trigger no reconcile, so a reconciler's own writes do not
    /// feed back into it.
    fn relevant(&self, _sub: &str) -> bool {
        true
    }
    /// Is a key that is not [`relevant`](Kind::relevant) still kept in the cache, for the
    /// reconciler to compare with what it wrote (a deleted or forged status: the objects
    /// whose such keys changed are listed by [`Reactor::take_report_changes`])? Its changes
    /// still trigger nothing, and an object with only such keys counts as absent.
    fn cached(&self, sub: &str) -> bool {
        self.relevant(sub)
    }
}

/// What the controller should do after a successful reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until the object changes (or the next resync).
    AwaitChange,
    /// Reconcile again after this delay.
    RequeueAfter(Duration),
}

/// A failed reconcile; retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The host failed (libvirt, netlink, nft, …).
    #[error("{0}")]
    Host(String),
}

/// Makes the host match one object. Called with `None` when the object was deleted.
pub trait Reconciler<K: Kind>: Send + Sync + 'static {
    /// Reconcile object `id`; never called twice at once for the same id.
    fn reconcile(
        &self,
        id: &str,
        entry: Option<Arc<Entry<K::Object>>>,
    ) -> impl Future<Output = Result<Action, ReconcileError>> + Send;
}

/// Tuning of a reactor.
#[derive(Debug, Clone)]
pub struct ReactorOptions {
    /// Concurrent reconciles (of different objects).
    pub workers: usize,
    /// First retry delay after a failure.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl Default for ReactorOptions {
    fn default() -> Self {
        ReactorOptions {
            workers: 4,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// Exponential backoff with jitter: the n-th retry (n ≥ 1) waits a random time in
/// `[d/2, d]` with `d = min(base · 2^(n-1), max)`.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(20);
    let d = base.saturating_mul(1u32 << exp).min(max);
    let half = d / 2;
    let jitter = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
    half + Duration::from_millis(jitter)
}

type Cache<O> = Arc<RwLock<BTreeMap<String, Arc<Entry<O>>>>>;

/// The per-object work queue: ready ids in order, ids currently reconciling, and ids that
/// changed while reconciling (run once more afterwards).
#[derive(Default)]
struct QueueState {
    ready: VecDeque<String>,
    queued: HashSet<String>,
    running: HashSet<String>,
    rerun: HashSet<String>,
}

#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    notify: Notify,
    /// Woken whenever a reconcile finishes (for [`Reactor::settle`]).
    finished: Notify,
}

impl Queue {
    fn push(&self, id: &str) {
        let mut s = lock(&self.state);
        if s.running.contains(id) {
            s.rerun.insert(id.to_string());
        } else if s.queued.insert(id.to_string()) {
            s.ready.push_back(id.to_string());
            drop(s);
            self.notify.notify_one();
        }
    }

    async fn pop(&self) -> String {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = lock(&self.state);
                if let Some(id) = s.ready.pop_front() {
                    s.queued.remove(&id);
                    s.running.insert(id.clone());
                    let more = !s.ready.is_empty();
                    drop(s);
                    if more {
                        self.notify.notify_one();
                    }
                    return id;
                }
            }
            notified.await;
        }
    }

    fn done(&self, id: &str) {
        let again = {
            let mut s = lock(&self.state);
            s.running.remove(id);
            s.rerun.remove(id)
        };
        if again {
            self.push(id);
        }
        self.finished.notify_waiters();
    }

    fn idle(&self) -> bool {
        let s = lock(&self.state);
        s.ready.is_empty() && s.running.is_empty()
    }

    /// Objects waiting for a reconcile: queued, or changed while running (run again).
    fn pending(&self) -> usize {
        let s = lock(&self.state);
        s.ready.len() + s.rerun.len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counters for tests, benchmarks and `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReactorStats {
    /// Full lists done (1 + relists).
    pub lists: u64,
    /// Watch events applied.
    pub events: u64,
    /// Reconciles run.
    pub reconciles: u64,
    /// Reconciles that failed.
    pub failures: u64,
    /// Objects waiting for a reconcile now (queued, or changed while reconciling): how far
    /// the workers are behind.
    pub pending: u64,
}

struct Shared<K: Kind> {
    kind: K,
    cache: Cache<K::Object>,
    queue: Queue,
    initial: Mutex<Option<HashSet<String>>>,
    synced: watch::Sender<bool>,
    stats: Mutex<ReactorStats>,
    /// How long each reconcile took (failed ones too).
    durations: Histogram,
    failures: Mutex<HashMap<String, u32>>,
    /// Objects whose cached, non-relevant keys (their own reports) changed since the last
    /// [`Reactor::take_report_changes`]: what a reconciler checks instead of every object.
    report_changes: Mutex<HashSet<String>>,
}

/// Handle to a running reactor: read its cache, trigger resyncs, wait for the initial sync.
pub struct Reactor<K: Kind> {
    shared: Arc<Shared<K>>,
    cancel: CancellationToken,
    tasks: Mutex<Option<JoinSet<()>>>,
}

impl<K: Kind> Reactor<K> {
    /// Start watching `kind`'s prefix in `store` and reconciling with `reconciler`.
    pub fn spawn<R: Reconciler<K>>(
        kind: K,
        reconciler: R,
        store: Store,
        opts: ReactorOptions,
        cancel: CancellationToken,
    ) -> Reactor<K> {
        let (synced, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            kind,
            cache: Arc::new(RwLock::new(BTreeMap::new())),
            queue: Queue::default(),
            initial: Mutex::new(None),
            synced,
            stats: Mutex::new(ReactorStats::default()),
            durations: Histogram::default(),
            failures: Mutex::new(HashMap::new()),
            report_changes: Mutex::new(HashSet::new()),
        });
        let reconciler = Arc::new(reconciler);
        let mut tasks = JoinSet::new();
        tasks.spawn(watch_loop(shared.clone(), store, cancel.clone()));
        for _ in 0..opts.workers.max(1) {
            tasks.spawn(worker(
                shared.clone(),
                reconciler.clone(),
                opts.clone(),
                cancel.clone(),
            ));
        }
        Reactor {
            shared,
            cancel,
            tasks: Mutex::new(Some(tasks)),
        }
    }

    /// The parsed object `id` with its raw keys, if present.
    pub fn get(&self, id: &str) -> Option<Arc<Entry<K::Object>>> {
        self.shared
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// A snapshot of every object.
    pub fn list(&self) -> Vec<(String, Arc<Entry<K::Object>>)> {
        self.shared
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The objects whose cached, non-[`relevant`](Kind::relevant) keys (a reconciler's own
    /// reports) changed in the watch since the last call, and forget them: a deleted or
    /// forged report triggers no reconcile, and checking only these keeps that check O(1)
    /// per tick when nothing changes. At most one entry per object.
    pub fn take_report_changes(&self) -> Vec<String> {
        let mut set = self
            .shared
            .report_changes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.drain().collect()
    }

    /// Enqueue every known object (periodic resync against the host).
    pub fn resync(&self) {
        let ids: Vec<String> = self
            .shared
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            self.shared.queue.push(&id);
        }
    }

    /// Enqueue every object and wait until the queue is idle (every one reconciled once
    /// since), at most `timeout`; true when it settled. How a duty that must be in place
    /// before the next step (the primary's gateways before it writes `primary`) waits.
    pub async fn settle(&self, timeout: std::time::Duration) -> bool {
        self.resync();
        let wait = async {
            loop {
                let finished = self.shared.queue.finished.notified();
                tokio::pin!(finished);
                finished.as_mut().enable();
                if self.shared.queue.idle() {
                    return;
                }
                finished.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Enqueue one object.
    pub fn enqueue(&self, id: &str) {
        self.shared.queue.push(id);
    }

    /// True once the first list was applied and every object in it reconciled once.
    pub fn is_synced(&self) -> bool {
        *self.shared.synced.borrow()
    }

    /// Wait until [`Reactor::is_synced`].
    pub async fn wait_synced(&self) {
        let mut rx = self.shared.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Counters, and the queue's length now.
    pub fn stats(&self) -> ReactorStats {
        let mut s = *lock(&self.shared.stats);
        s.pending = self.shared.queue.pending() as u64;
        s
    }

    /// The durations of every reconcile run so far (fixed buckets, 1 ms to 30 s), for
    /// `/metrics`: a slow host shows here before it shows as failures.
    pub fn reconcile_durations(&self) -> HistogramSnapshot {
        self.shared.durations.snapshot()
    }

    /// Stop the watcher and workers and wait for them (a running reconcile finishes first).
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        let tasks = lock(&self.tasks).take();
        if let Some(mut t) = tasks {
            while t.join_next().await.is_some() {}
        }
    }
}

/// The keys of one object, relative to `<prefix><id>/`.
pub type ObjectKeys = BTreeMap<String, KeyEntry>;

impl From<Kv> for KeyEntry {
    /// The entry of a key read or watched from the store.
    fn from(kv: Kv) -> KeyEntry {
        KeyEntry {
            value: kv.value,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }
    }
}

impl KeyEntry {
    /// The keys of one object from `(sub-key, value)` pairs, unleased, at revision 1: how
    /// tests and tools build an object without a store.
    pub fn object(pairs: &[(&str, &str)]) -> ObjectKeys {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    KeyEntry {
                        value: v.as_bytes().to_vec(),
                        mod_revision: 1,
                        lease: 0,
                    },
                )
            })
            .collect()
    }
}

/// Group a listing under `prefix` into objects (`nodes/n1/info` → `n1` → `info`), keeping
/// the sub-keys `keep` accepts. Shared by the reactor and the tools that read a prefix once
/// (`debvisorctl`, the firewall stage).
pub fn group_keys(
    prefix: &str,
    kvs: Vec<Kv>,
    keep: impl Fn(&str) -> bool,
) -> BTreeMap<String, ObjectKeys> {
    let mut out: BTreeMap<String, ObjectKeys> = BTreeMap::new();
    for kv in kvs {
        if let Some((id, sub)) = split_object_key(prefix, &kv.key).filter(|(_, sub)| keep(sub)) {
            let sub = sub.to_string();
            out.entry(id.to_string())
                .or_default()
                .insert(sub, KeyEntry::from(kv));
        }
    }
    out
}

fn group_by_object<K: Kind>(kind: &K, kvs: Vec<Kv>) -> BTreeMap<String, ObjectKeys> {
    let mut grouped = group_keys(kind.prefix(), kvs, |sub| kind.cached(sub));
    grouped.retain(|_, keys| has_relevant(kind, keys));
    grouped
}

/// Does the object have a key of its desired state (else it counts as absent)?
fn has_relevant<K: Kind>(kind: &K, keys: &ObjectKeys) -> bool {
    keys.keys().any(|k| kind.relevant(k))
}

/// `nodes/n1/info/fqdn` with prefix `nodes/` → (`n1`, `info/fqdn`).
fn split_object_key<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = key.strip_prefix(prefix)?;
    let (id, sub) = rest.split_once('/').unwrap_or((rest, ""));
    (!id.is_empty()).then_some((id, sub))
}

fn make_entry<K: Kind>(
    kind: &K,
    id: &str,
    keys: BTreeMap<String, KeyEntry>,
) -> Arc<Entry<K::Object>> {
    let parsed = kind.parse(id, &keys).map(Arc::new);
    Arc::new(Entry { keys, parsed })
}

/// Replace the cache with a fresh list; returns the ids that changed or vanished.
fn apply_list<K: Kind>(
    shared: &Shared<K>,
    grouped: BTreeMap<String, BTreeMap<String, KeyEntry>>,
) -> (Vec<String>, usize) {
    let mut cache = shared.cache.write().unwrap_or_else(|p| p.into_inner());
    let mut changed = Vec::new();
    let vanished: Vec<String> = cache
        .keys()
        .filter(|id| !grouped.contains_key(*id))
        .cloned()
        .collect();
    for id in &vanished {
        cache.remove(id);
        changed.push(id.clone());
    }
    let n_vanished = vanished.len();
    for (id, keys) in grouped {
        let same = cache.get(&id).map(|e| e.keys == keys).unwrap_or(false);
        if !same {
            let entry = make_entry(&shared.kind, &id, keys);
            cache.insert(id.clone(), entry);
            changed.push(id);
        }
    }
    (changed, n_vanished)
}

/// Apply one watch event; returns the object id it touched.
fn apply_event<K: Kind>(shared: &Shared<K>, key: &str, put: Option<KeyEntry>) -> Option<String> {
    let (id, sub) = split_object_key(shared.kind.prefix(), key)?;
    if !shared.kind.cached(sub) {
        return None;
    }
    let triggers = shared.kind.relevant(sub);
    let mut cache = shared.cache.write().unwrap_or_else(|p| p.into_inner());
    let mut keys = cache.get(id).map(|e| e.keys.clone()).unwrap_or_default();
    match put {
        Some(v) => {
            keys.insert(sub.to_string(), v);
        }
        None => {
            keys.remove(sub);
        }
    }
    if !has_relevant(&shared.kind, &keys) {
        // Only reports left (or nothing): absent. A report alone never creates an object.
        if !triggers && !cache.contains_key(id) {
            return None;
        }
        cache.remove(id);
    } else {
        let entry = make_entry(&shared.kind, id, keys);
        cache.insert(id.to_string(), entry);
    }
    drop(cache);
    if !triggers {
        // After the cache holds the change: whoever takes the id reads the new keys.
        shared
            .report_changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
    }
    triggers.then(|| id.to_string())
}

async fn watch_loop<K: Kind>(shared: Arc<Shared<K>>, store: Store, cancel: CancellationToken) {
    let prefix = shared.kind.prefix().to_string();
    let mut attempt: u32 = 0;
    let mut first = true;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        // List.
        let listed = tokio::select! {
            _ = cancel.cancelled() => return,
            r = store.list(&prefix) => r,
        };
        let (kvs, rev) = match listed {
            Ok(x) => x,
            Err(e) => {
                attempt += 1;
                let d = backoff(Duration::from_millis(200), Duration::from_secs(5), attempt);
                if attempt == 1 || attempt % 10 == 0 {
                    warn!(kind = K::NAME, error = %e, attempt, retry_in_ms = d.as_millis() as u64, "cannot list objects; retrying");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(d) => continue,
                }
            }
        };
        if attempt > 0 && !first {
            info!(
                kind = K::NAME,
                attempts = attempt,
                "store reachable again; relisted"
            );
        }
        attempt = 0;
        let grouped = group_by_object(&shared.kind, kvs);
        let count = grouped.len();
        let (changed, vanished) = apply_list(&shared, grouped);
        lock(&shared.stats).lists += 1;
        if first {
            let ids: HashSet<String> = changed.iter().cloned().collect();
            let empty = ids.is_empty();
            *lock(&shared.initial) = Some(ids);
            if empty {
                shared.synced.send_replace(true);
            }
            info!(
                kind = K::NAME,
                objects = count,
                revision = rev,
                "initial list"
            );
            first = false;
        } else {
            info!(
                kind = K::NAME,
                objects = count,
                changed = changed.len(),
                vanished,
                revision = rev,
                "relisted; objects missing from the list are treated as deleted"
            );
        }
        for id in &changed {
            shared.queue.push(id);
        }

        // Watch from R+1 until it breaks.
        let mut next_rev = rev + 1;
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            s = store.watch(&prefix, next_rev) => s,
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!(kind = K::NAME, error = %e, "cannot start watch; relisting");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff(Duration::from_millis(200), Duration::from_secs(5), 1)) => continue,
                }
            }
        };
        let reason = loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return,
                m = stream.message() => m,
            };
            match msg {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        break if resp.compact_revision() > 0 {
                            format!(
                                "watch from revision {next_rev} is compacted (compact revision {})",
                                resp.compact_revision()
                            )
                        } else {
                            format!("watch canceled by server: {}", resp.cancel_reason())
                        };
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let Some(kv) = store.convert(kv) else {
                            continue;
                        };
                        next_rev = next_rev.max(kv.mod_revision + 1);
                        let put = match ev.event_type() {
                            etcd_client::EventType::Put => Some(KeyEntry {
                                value: kv.value,
                                mod_revision: kv.mod_revision,
                                lease: kv.lease,
                            }),
                            etcd_client::EventType::Delete => None,
                        };
                        if let Some(id) = apply_event(&shared, &kv.key, put) {
                            lock(&shared.stats).events += 1;
                            shared.queue.push(&id);
                        }
                    }
                }
                Ok(None) => break "watch stream closed".to_string(),
                Err(e) => break format!("watch failed: {}", crate::store::error_chain(&e)),
            }
        };
        warn!(kind = K::NAME, reason = %reason, "watch broken; relisting");
        // A tiny pause so a dead server is not hammered; the list itself backs off further.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff(Duration::from_millis(100), Duration::from_secs(1), 1)) => {}
        }
    }
}

async fn worker<K: Kind, R: Reconciler<K>>(
    shared: Arc<Shared<K>>,
    reconciler: Arc<R>,
    opts: ReactorOptions,
    cancel: CancellationToken,
) {
    loop {
        let id = tokio::select! {
            _ = cancel.cancelled() => return,
            id = shared.queue.pop() => id,
        };
        let entry = shared
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        let started = std::time::Instant::now();
        let result = reconciler.reconcile(&id, entry).await;
        shared.durations.observe(started.elapsed());
        {
            let mut st = lock(&shared.stats);
            st.reconciles += 1;
            if result.is_err() {
                st.failures += 1;
            }
        }
        match result {
            Ok(action) => {
                lock(&shared.failures).remove(&id);
                if let Action::RequeueAfter(d) = action {
                    schedule(shared.clone(), id.clone(), d, cancel.clone());
                }
            }
            Err(e) => {
                let n = {
                    let mut f = lock(&shared.failures);
                    let n = f.entry(id.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                let d = backoff(opts.backoff_base, opts.backoff_max, n);
                warn!(kind = K::NAME, object = %id, error = %e, attempt = n, retry_in_ms = d.as_millis() as u64, "reconcile failed; will retry");
                schedule(shared.clone(), id.clone(), d, cancel.clone());
            }
        }
        shared.queue.done(&id);
        let now_synced = {
            let mut init = lock(&shared.initial);
            match init.as_mut() {
                Some(set) if !set.is_empty() => {
                    set.remove(&id);
                    set.is_empty()
                }
                _ => false,
            }
        };
        if now_synced {
            debug!(kind = K::NAME, "initial sync complete");
            shared.synced.send_replace(true);
        }
    }
}

fn schedule<K: Kind>(
    shared: Arc<Shared<K>>,
    id: String,
    after: Duration,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(after) => shared.queue.push(&id),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 1..30 {
            let d = backoff(base, max, attempt);
            let cap = base.saturating_mul(1u32 << (attempt - 1).min(20)).min(max);
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
    }

    /// Objects under `t/`: `spec` is desired state, `status` a cached report.
    struct ReportKind;

    impl Kind for ReportKind {
        type Object = ();
        const NAME: &'static str = "t";
        fn prefix(&self) -> &str {
            "t/"
        }
        fn parse(&self, _: &str, _: &BTreeMap<String, KeyEntry>) -> Result<(), ObjectError> {
            Ok(())
        }
        fn relevant(&self, sub: &str) -> bool {
            sub == "spec"
        }
        fn cached(&self, sub: &str) -> bool {
            sub == "spec" || sub == "status"
        }
    }

    #[test]
    fn report_changes_list_objects_whose_cached_reports_changed() {
        let shared = Shared {
            kind: ReportKind,
            cache: Arc::new(RwLock::new(BTreeMap::new())),
            queue: Queue::default(),
            initial: Mutex::new(None),
            synced: watch::channel(false).0,
            stats: Mutex::new(ReactorStats::default()),
            durations: Histogram::default(),
            failures: Mutex::new(HashMap::new()),
            report_changes: Mutex::new(HashSet::new()),
        };
        let kv = |v: &str| KeyEntry {
            value: v.as_bytes().to_vec(),
            mod_revision: 1,
            lease: 0,
        };
        let changes = || lock(&shared.report_changes).clone();
        assert_eq!(
            apply_event(&shared, "t/a/spec", Some(kv("x"))),
            Some("a".into())
        );
        assert!(changes().is_empty(), "desired state is no report change");
        // A report: no reconcile, but listed, with the cache already holding it.
        assert_eq!(apply_event(&shared, "t/a/status", Some(kv("s"))), None);
        assert_eq!(apply_event(&shared, "t/a/status", None), None);
        assert_eq!(changes(), HashSet::from(["a".to_string()]));
        assert!(!shared.cache.read().unwrap_or_else(|p| p.into_inner())["a"]
            .keys
            .contains_key("status"));
        // An uncached key is neither.
        assert_eq!(apply_event(&shared, "t/b/other", Some(kv("o"))), None);
        assert_eq!(changes(), HashSet::from(["a".to_string()]));
    }

    #[test]
    fn object_keys_split() {
        assert_eq!(
            split_object_key("nodes/", "nodes/n1/info/fqdn"),
            Some(("n1", "info/fqdn"))
        );
        assert_eq!(split_object_key("nodes/", "nodes/n1"), Some(("n1", "")));
        assert_eq!(split_object_key("nodes/", "vms/x"), None);
        assert_eq!(split_object_key("nodes/", "nodes//x"), None);
    }

    #[tokio::test]
    async fn queue_coalesces_and_never_runs_one_id_twice() {
        let q = Queue::default();
        q.push("a");
        q.push("a");
        q.push("b");
        assert_eq!(q.pop().await, "a");
        // "a" is running: pushes mark it for one rerun, not a second concurrent run.
        q.push("a");
        q.push("a");
        assert_eq!(q.pop().await, "b");
        {
            let s = lock(&q.state);
            assert!(s.ready.is_empty());
            assert!(s.rerun.contains("a"));
        }
        q.done("a");
        assert_eq!(q.pop().await, "a");
        q.done("a");
        q.done("b");
        let s = lock(&q.state);
        assert!(s.ready.is_empty() && s.running.is_empty() && s.rerun.is_empty());
    }
}
