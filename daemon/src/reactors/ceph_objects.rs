//! The Ceph objects' host side: pools and volumes (with their snapshots) declared in etcd,
//! planned by the pure `debvisor_objects::ceph_plan`, carried out through the [`Ceph`]
//! driver, with one status per object written back.
//!
//! Only the primary reconciles (a standalone node always is one). Nothing in Ceph is ever
//! deleted because a spec disappeared or is invalid: only `delete: true` removes. A Ceph
//! failure (timeout, unreachable, command failed) becomes an error status naming `ceph` (or
//! the step that failed) and a retry with backoff; the next successful pass reports `ready`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use debvisor_objects::ceph::{
    parse_template, pool_status_key, snapshot_status_key, volume_status_key, CephState, CephStatus,
    CloneSource, Pool, PoolKind, Volume, VolumeKind, TEMPLATES_PREFIX, VOLUMES_PREFIX,
};
use debvisor_objects::ceph_plan::{
    plan_pool, plan_volume, PoolStep, Verdict, VolumeContext, VolumeStep,
};
use debvisor_objects::{
    Action, Entry, ObjectError, Reactor, ReactorOptions, ReconcileError, Reconciler, Store,
    TxnBuilder,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ceph::{
    apply_pool_step, apply_volume_step, observe_volume, observed_pools, volume_in_use, Ceph,
    CephError, ImageRef,
};

/// How soon a pass that applied steps is followed by one that confirms the result.
const CONFIRM_AFTER: Duration = Duration::from_millis(100);

/// Everything the pool and volume reconcilers share on this node.
pub struct CephObjects<C: Ceph> {
    node: String,
    store: Store,
    ceph: Arc<C>,
    primary: AtomicBool,
    interval: Duration,
    /// The statuses this process last wrote, by key (writes only on change).
    written: Mutex<BTreeMap<String, CephStatus>>,
    /// Rollback tokens done by this process, by volume id and snapshot, kept from the moment
    /// the rollback returned: if writing the status fails, the retry must not roll back a
    /// second time (the store only learns the token with the status).
    tokens: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
}

/// A short name of a pool step for status fields and logs.
fn pool_step_name(s: &PoolStep) -> &'static str {
    match s {
        PoolStep::Create { .. } => "pool-create",
        PoolStep::SetSize(_) => "pool-set-size",
        PoolStep::Delete => "pool-delete",
    }
}

/// A short name of a volume step for status fields and logs.
fn volume_step_name(s: &VolumeStep) -> &'static str {
    match s {
        VolumeStep::Create { .. } => "create",
        VolumeStep::Clone { .. } => "clone",
        VolumeStep::Resize { .. } => "resize",
        VolumeStep::CreateSnapshot(_) => "snapshot-create",
        VolumeStep::Rollback { .. } => "rollback",
        VolumeStep::RemoveSnapshot { .. } => "snapshot-remove",
        VolumeStep::PurgeAndRemove => "purge-and-remove",
    }
}

/// The status for a planner verdict.
fn verdict_status(v: &Verdict, rolled_back: Option<String>) -> CephStatus {
    let (field, error) = match v {
        Verdict::Error(e) => (Some(e.field.clone()), Some(e.reason.clone())),
        _ => (None, None),
    };
    CephStatus {
        state: v.state(),
        field,
        error,
        rolled_back,
        since: None,
    }
}

/// An error status naming `field` (`ceph`, `ceph.<step>`).
fn ceph_error_status(field: String, e: &CephError, rolled_back: Option<String>) -> CephStatus {
    CephStatus {
        state: CephState::Error,
        field: Some(field),
        error: Some(e.to_string()),
        rolled_back,
        since: None,
    }
}

fn host_err(what: &str, e: &CephError) -> ReconcileError {
    ReconcileError::Host(format!("{what}: {e}"))
}

/// One log line per state change of a status key, with the object as `pool=`/`volume=`.
fn log_transition(
    node: &str,
    object: &'static str,
    id: &str,
    key: &str,
    from: Option<CephState>,
    st: &CephStatus,
) {
    let key = key.strip_suffix("/status").unwrap_or(key);
    let field = st.field.as_deref().unwrap_or("");
    let reason = st.error.as_deref().unwrap_or("");
    let name = |s: CephState| format!("{s:?}").to_lowercase();
    let (from, to) = (from.map_or_else(|| "none".into(), name), name(st.state));
    match (object, st.state) {
        ("pool", CephState::Error) => warn!(
            node,
            pool = id,
            key,
            from,
            to,
            field,
            reason,
            "ceph object state changed"
        ),
        ("pool", _) => info!(node, pool = id, key, from, to, "ceph object state changed"),
        (_, CephState::Error) => warn!(
            node,
            volume = id,
            key,
            from,
            to,
            field,
            reason,
            "ceph object state changed"
        ),
        _ => info!(
            node,
            volume = id,
            key,
            from,
            to,
            "ceph object state changed"
        ),
    }
}

/// The parsed object out of a reactor entry, as the planner takes it.
fn parsed<O: Clone>(entry: &Entry<O>) -> Result<O, ObjectError> {
    entry
        .parsed
        .as_ref()
        .map(|o| (**o).clone())
        .map_err(Clone::clone)
}

impl<C: Ceph + 'static> CephObjects<C> {
    /// The Ceph objects of `node`; `primary` decides whether it reconciles at all and
    /// `interval` is the requeue of objects waiting for something not watched (templates).
    pub fn new(
        node: String,
        store: Store,
        ceph: Arc<C>,
        primary: bool,
        interval: Duration,
    ) -> CephObjects<C> {
        CephObjects {
            node,
            store,
            ceph,
            primary: AtomicBool::new(primary),
            interval,
            written: Mutex::new(BTreeMap::new()),
            tokens: Mutex::new(BTreeMap::new()),
        }
    }

    /// Change the primary flag (an election in a cluster); resync the reactors after it.
    pub fn set_primary(&self, primary: bool) {
        self.primary.store(primary, Ordering::SeqCst);
    }

    fn is_primary(&self) -> bool {
        self.primary.load(Ordering::SeqCst)
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, String>>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn written(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, CephStatus>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write the statuses of one object that differ from what this process last wrote, in
    /// one transaction; `since` is kept while the state stays the same. `object` is the log
    /// field (`pool` or `volume`) and `id` its value.
    async fn write_statuses(
        &self,
        object: &'static str,
        id: &str,
        statuses: Vec<(String, CephStatus)>,
    ) -> Result<(), ReconcileError> {
        let now = crate::hostinfo::now_rfc3339();
        let mut changed = Vec::new();
        {
            let written = self.written();
            for (key, mut st) in statuses {
                let old = written.get(&key);
                if let Some(o) = old {
                    let same = CephStatus {
                        since: o.since.clone(),
                        ..st.clone()
                    };
                    if &same == o {
                        continue;
                    }
                }
                st.since = match old {
                    Some(o) if o.state == st.state => o.since.clone(),
                    _ => Some(now.clone()),
                };
                let from = old.map(|o| o.state);
                changed.push((key, st, from));
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        let mut txn = TxnBuilder::new();
        for (key, st, _) in &changed {
            txn = txn.put(key, serde_json::to_vec(st).unwrap_or_default());
        }
        self.store.txn(txn).await?;
        let mut written = self.written();
        for (key, st, from) in changed {
            if from != Some(st.state) {
                log_transition(&self.node, object, id, &key, from, &st);
            }
            written.insert(key, st);
        }
        Ok(())
    }

    /// The object is gone from etcd: forget what we wrote for it (Ceph is left alone).
    fn forget(&self, status_prefix: &str) {
        self.written().retain(|k, _| !k.starts_with(status_prefix));
    }

    /// One pass over pool `id`.
    pub async fn reconcile_pool(
        &self,
        id: &str,
        entry: Option<Arc<Entry<Pool>>>,
    ) -> Result<Action, ReconcileError> {
        if !self.is_primary() {
            return Ok(Action::AwaitChange);
        }
        let Some(entry) = entry else {
            info!(node = %self.node, pool = id, "pool spec removed; forgetting it (nothing deleted in Ceph)");
            self.forget(&pool_status_key(id));
            return Ok(Action::AwaitChange);
        };
        let status_key = pool_status_key(id);
        let parsed = parsed(&entry);
        // An invalid spec needs no Ceph call.
        let observed = match &parsed {
            Err(_) => None,
            Ok(_) => match self.ceph.pool_list().await {
                Ok(list) => observed_pools(&list).remove(id),
                Err(e) => {
                    warn!(node = %self.node, pool = id, error = %e, "ceph unavailable; pool not reconciled");
                    self.write_statuses(
                        "pool",
                        id,
                        vec![(status_key, ceph_error_status("ceph".into(), &e, None))],
                    )
                    .await?;
                    return Err(host_err("ceph pool list", &e));
                }
            },
        };
        let plan = plan_pool(&parsed, observed.as_ref());
        for step in &plan.steps {
            if let Err(e) = apply_pool_step(&*self.ceph, id, step).await {
                let name = pool_step_name(step);
                warn!(node = %self.node, pool = id, step = name, error = %e, "ceph pool step failed");
                self.write_statuses(
                    "pool",
                    id,
                    vec![(
                        status_key,
                        ceph_error_status(format!("ceph.{name}"), &e, None),
                    )],
                )
                .await?;
                return Err(host_err(name, &e));
            }
        }
        self.write_statuses(
            "pool",
            id,
            vec![(status_key, verdict_status(&plan.verdict, None))],
        )
        .await?;
        Ok(if plan.steps.is_empty() {
            Action::AwaitChange
        } else {
            Action::RequeueAfter(CONFIRM_AFTER)
        })
    }

    /// Templates by name, parsed or why not (one prefix read).
    async fn templates(
        &self,
    ) -> Result<
        BTreeMap<String, Result<debvisor_objects::ceph::Template, ObjectError>>,
        ReconcileError,
    > {
        let (kvs, _) = self.store.list(TEMPLATES_PREFIX).await?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| {
                let name = kv.key.strip_prefix(TEMPLATES_PREFIX)?.to_owned();
                let t = parse_template(&name, &kv.value);
                Some((name, t))
            })
            .collect())
    }

    /// Last rollback token done per snapshot, from the snapshot status keys in the store
    /// (they survive a restart of the daemon).
    async fn rolled_back(&self, id: &str) -> Result<BTreeMap<String, String>, ReconcileError> {
        let prefix = format!("{VOLUMES_PREFIX}{id}/snapshots/");
        let (kvs, _) = self.store.list(&prefix).await?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| {
                let snap = kv.key.strip_prefix(&prefix)?.strip_suffix("/status")?;
                let st: CephStatus = serde_json::from_slice(&kv.value).ok()?;
                Some((snap.to_owned(), st.rolled_back?))
            })
            .collect())
    }

    /// Ceph did not answer while observing volume `id`: error status naming `ceph`, retry.
    async fn ceph_unavailable(
        &self,
        id: &str,
        status_key: String,
        e: CephError,
    ) -> Result<Action, ReconcileError> {
        warn!(node = %self.node, volume = id, error = %e, "ceph unavailable; volume not reconciled");
        self.write_statuses(
            "volume",
            id,
            vec![(status_key, ceph_error_status("ceph".into(), &e, None))],
        )
        .await?;
        Err(host_err("ceph observe", &e))
    }

    /// One pass over volume `id` (`<pool>:<image>`) and its declared snapshots.
    pub async fn reconcile_volume(
        &self,
        id: &str,
        entry: Option<Arc<Entry<Volume>>>,
    ) -> Result<Action, ReconcileError> {
        if !self.is_primary() {
            return Ok(Action::AwaitChange);
        }
        let Some(entry) = entry else {
            info!(node = %self.node, volume = id, "volume spec removed; forgetting it (nothing deleted in Ceph)");
            self.forget(&format!("{VOLUMES_PREFIX}{id}/"));
            self.tokens().remove(id);
            return Ok(Action::AwaitChange);
        };
        let parsed = parsed(&entry);
        let vol = match &parsed {
            Ok(v) => v,
            Err(e) => {
                // The id may be no `<pool>:<image>` at all: write under the id as given.
                let key = format!("{VOLUMES_PREFIX}{id}/status");
                warn!(node = %self.node, volume = id, field = %e.field, reason = %e.reason, "volume spec invalid; nothing done for it");
                self.write_statuses(
                    "volume",
                    id,
                    vec![(key, verdict_status(&Verdict::Error(e.clone()), None))],
                )
                .await?;
                return Ok(Action::AwaitChange);
            }
        };
        let (pool, image) = (vol.pool.as_str(), vol.image.as_str());
        let status_key = volume_status_key(pool, image);
        let mut rolled_back = self.rolled_back(id).await?;
        if let Some(t) = self.tokens().get(id) {
            rolled_back.extend(t.clone());
        }
        let img = ImageRef::new(pool, image);
        let observed = match observe_volume(&*self.ceph, &img).await {
            Ok(o) => o,
            Err(e) => return self.ceph_unavailable(id, status_key, e).await,
        };
        // Templates matter only to a volume still to be cloned from one: no prefix read of
        // `templates/` for every existing volume on every resync.
        let templates = match (&observed, &vol.spec.clone_from) {
            (None, Some(CloneSource::Template(_))) => self.templates().await?,
            _ => BTreeMap::new(),
        };
        // Whether a VM uses the volume (`rbd status`) only matters to a rollback or a
        // removal: plan without it first and ask Ceph only when one of those is planned.
        let mut ctx = VolumeContext {
            templates: Some(&templates),
            in_use: false,
            rolled_back: Some(&rolled_back),
        };
        let mut plan = plan_volume(&parsed, observed.as_ref(), &ctx);
        let needs_in_use = plan
            .steps
            .iter()
            .any(|s| matches!(s, VolumeStep::Rollback { .. } | VolumeStep::PurgeAndRemove));
        if needs_in_use {
            ctx.in_use = match volume_in_use(&*self.ceph, &img).await {
                Ok(u) => u,
                Err(e) => return self.ceph_unavailable(id, status_key, e).await,
            };
            plan = plan_volume(&parsed, observed.as_ref(), &ctx);
        }
        let mut done = rolled_back.clone();
        let mut failure = None;
        for step in &plan.steps {
            match apply_volume_step(&*self.ceph, &img, step).await {
                Ok(Some(token)) => {
                    if let VolumeStep::Rollback { snapshot, .. } = step {
                        self.tokens()
                            .entry(id.to_owned())
                            .or_default()
                            .insert(snapshot.clone(), token.clone());
                        done.insert(snapshot.clone(), token);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let name = volume_step_name(step);
                    warn!(node = %self.node, volume = id, step = name, error = %e, "ceph volume step failed");
                    failure = Some((name, e));
                    break;
                }
            }
        }
        let mut statuses = Vec::new();
        let vol_status = match &failure {
            Some((name, e)) => ceph_error_status(format!("ceph.{name}"), e, None),
            None => verdict_status(&plan.verdict, None),
        };
        statuses.push((status_key, vol_status));
        for (snap, v) in &plan.snapshots {
            statuses.push((
                snapshot_status_key(pool, image, snap),
                verdict_status(v, done.get(snap).cloned()),
            ));
        }
        self.write_statuses("volume", id, statuses).await?;
        if let Some((name, e)) = failure {
            return Err(host_err(name, &e));
        }
        if !plan.steps.is_empty() {
            return Ok(Action::RequeueAfter(CONFIRM_AFTER));
        }
        // A template may appear later; templates are not watched.
        let waits_for_template =
            matches!(&plan.verdict, Verdict::Error(e) if e.field == "spec.clone_from.template");
        Ok(if waits_for_template {
            Action::RequeueAfter(self.interval)
        } else {
            Action::AwaitChange
        })
    }
}

/// [`Reconciler`] of pools over a shared [`CephObjects`].
pub struct PoolReconciler<C: Ceph>(pub Arc<CephObjects<C>>);

impl<C: Ceph + 'static> Reconciler<PoolKind> for PoolReconciler<C> {
    async fn reconcile(
        &self,
        id: &str,
        entry: Option<Arc<Entry<Pool>>>,
    ) -> Result<Action, ReconcileError> {
        self.0.reconcile_pool(id, entry).await
    }
}

/// [`Reconciler`] of volumes (with their snapshots) over a shared [`CephObjects`].
pub struct VolumeReconciler<C: Ceph>(pub Arc<CephObjects<C>>);

impl<C: Ceph + 'static> Reconciler<VolumeKind> for VolumeReconciler<C> {
    async fn reconcile(
        &self,
        id: &str,
        entry: Option<Arc<Entry<Volume>>>,
    ) -> Result<Action, ReconcileError> {
        self.0.reconcile_volume(id, entry).await
    }
}

/// The two Ceph reactors of a node, resynced against Ceph every `ceph.interval` (Ceph calls
/// are expensive: not on every keepalive tick).
pub struct CephReactors {
    /// Pools.
    pub pools: Arc<Reactor<PoolKind>>,
    /// Volumes with their snapshots.
    pub volumes: Arc<Reactor<VolumeKind>>,
    /// Sets the objects' primary flag.
    primary: Arc<dyn Fn(bool) + Send + Sync>,
}

impl CephReactors {
    /// Start both reactors over `objects` and their resync timer (stopped by `cancel`).
    pub fn spawn<C: Ceph + 'static>(
        objects: Arc<CephObjects<C>>,
        cancel: CancellationToken,
    ) -> CephReactors {
        let store = objects.store.clone();
        let interval = objects.interval;
        let flag = objects.clone();
        let primary: Arc<dyn Fn(bool) + Send + Sync> = Arc::new(move |p| flag.set_primary(p));
        let pools = Arc::new(Reactor::spawn(
            PoolKind,
            PoolReconciler(objects.clone()),
            store.clone(),
            ReactorOptions::default(),
            CancellationToken::new(),
        ));
        let volumes = Arc::new(Reactor::spawn(
            VolumeKind,
            VolumeReconciler(objects),
            store,
            ReactorOptions::default(),
            CancellationToken::new(),
        ));
        let (p, v) = (pools.clone(), volumes.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                p.resync();
                v.resync();
            }
        });
        CephReactors {
            pools,
            volumes,
            primary,
        }
    }

    /// The role changed: reconcile (as the primary) or leave Ceph alone; a new primary
    /// looks at every object at once.
    pub fn set_primary(&self, primary: bool) {
        (self.primary)(primary);
        if primary {
            self.pools.resync();
            self.volumes.resync();
        }
    }

    /// Wait until both reconciled their initial list once.
    pub async fn wait_synced(&self) {
        self.pools.wait_synced().await;
        self.volumes.wait_synced().await;
    }

    /// `N pools, M volumes` for the objects stage detail.
    pub fn describe(&self) -> String {
        format!(
            "{} pools, {} volumes",
            self.pools.list().len(),
            self.volumes.list().len()
        )
    }

    /// Stop both reactors (a running reconcile finishes first).
    pub async fn shutdown(&self) {
        self.pools.shutdown().await;
        self.volumes.shutdown().await;
    }
}
