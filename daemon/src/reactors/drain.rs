//! Node drain through `nodes/<node>/domain_state`: `flush` moves every VM off this node by
//! its migration method (targets chosen by `node_selector` among nodes in `run` + `ready`,
//! honouring `node_limit`; method `none` shuts the VM down and marks it `flushed_from`), then
//! `flushed`; `unflush` brings back the VMs whose `last_node` is this node and starts the
//! marked ones, then `ready`.
//!
//! Each pass is level-triggered and idempotent (run on every resync tick): it issues the
//! requests still missing, each a transaction guarded on the VM's keys, and moves the state
//! on once nothing is left. The Domain object does the actual moving. Each pass reports its
//! progress in `nodes/<node>/drain` (VMs left, and why each waits) when that changed.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use debvisor_objects::domain::{
    self, key_revision, DesiredState, MigrationMethod, Vm, VmField, VmKind,
};
use debvisor_objects::drain::{DrainReport, DrainWait};
use debvisor_objects::node::{DomainState, NodeKind, NodeRecord};
use debvisor_objects::placement;
use debvisor_objects::reactor::KeyEntry;
use debvisor_objects::schema::{self, NodeField};
use debvisor_objects::{Reactor, Store, StoreError, TxnBuilder};
use tracing::{info, warn};

/// Drain bookkeeping of one node (what was already logged).
pub struct Drain {
    node: String,
    store: Store,
    /// VMs whose "no target" problem was logged in this drain (logged once each).
    warned: Mutex<HashSet<String>>,
    /// The drain report last written, and since when its state holds.
    reported: Mutex<Option<DrainReport>>,
}

impl Drain {
    /// Drain handling for `node`.
    pub fn new(node: String, store: Store) -> Drain {
        Drain {
            node,
            store,
            warned: Mutex::new(HashSet::new()),
            reported: Mutex::new(None),
        }
    }

    /// Write `nodes/<node>/drain` when the report differs from the last one written (the
    /// `since` of a state is kept across passes). A failed write is retried next pass.
    async fn report(&self, state: DomainState, mut waiting: Vec<DrainWait>, remaining: usize) {
        let last = self
            .reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let since = match &last {
            Some(r) if r.state == state.as_str() => r.since.clone(),
            _ => crate::hostinfo::now_rfc3339(),
        };
        waiting.truncate(DrainReport::MAX_WAITING);
        let report = DrainReport {
            state: state.as_str().to_string(),
            since,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            waiting,
        };
        if last.as_ref() == Some(&report) {
            return;
        }
        let value = serde_json::to_vec(&report).unwrap_or_default();
        let key = schema::node_key(&self.node, NodeField::Drain);
        match self.store.put(&key, value).await {
            Ok(()) => {
                *self.reported.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
            }
            Err(e) => {
                warn!(node = %self.node, error = %e, "cannot write the drain report; retrying on the next pass")
            }
        }
    }

    fn warn_once(&self, uuid: &str) -> bool {
        self.warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uuid.to_string())
    }

    /// One pass: act on this node's `domain_state`. Returns the state after the pass.
    pub async fn pass(
        &self,
        nodes: &Reactor<NodeKind>,
        vms: &Reactor<VmKind>,
    ) -> Result<Option<DomainState>, StoreError> {
        let me = self.node.as_str();
        let records: Vec<NodeRecord> = nodes
            .list()
            .into_iter()
            .filter_map(|(_, e)| e.parsed.as_ref().ok().map(|n| (**n).clone()))
            .collect();
        let state = records
            .iter()
            .find(|n| n.name == me)
            .and_then(|n| n.domain_state);
        // The VMs are copied only while draining: the pass runs on every keepalive tick,
        // and the common case (ready) must not cost O(VMs).
        let copy = || -> Vec<(Vm, BTreeMap<String, KeyEntry>)> {
            vms.list()
                .into_iter()
                .filter_map(|(_, e)| {
                    e.parsed
                        .as_ref()
                        .ok()
                        .map(|v| ((**v).clone(), e.keys.clone()))
                })
                .collect()
        };
        match state {
            Some(DomainState::Flush) => self.flush(&records, &copy()).await,
            Some(DomainState::Unflush) => self.unflush(&copy()).await,
            other => {
                self.warned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                Ok(other)
            }
        }
    }

    async fn flush(
        &self,
        records: &[NodeRecord],
        vms: &[(Vm, BTreeMap<String, KeyEntry>)],
    ) -> Result<Option<DomainState>, StoreError> {
        let me = self.node.as_str();
        let mut remaining = 0usize;
        let mut waiting = Vec::new();
        let wait = |vm: &Vm, reason: String| DrainWait {
            uuid: vm.uuid.clone(),
            name: vm.name.clone(),
            reason,
        };
        for (vm, keys) in vms {
            let here = vm.node.as_deref() == Some(me) && vm.state.runs();
            let locked_here = vm.lock.as_ref().is_some_and(|l| l.node == me);
            if !here && !locked_here {
                continue;
            }
            remaining += 1;
            if !here {
                // Already requested; the Domain object is moving it.
                waiting.push(wait(
                    vm,
                    format!(
                        "{} to {} in progress",
                        vm.state,
                        vm.node.as_deref().unwrap_or("-")
                    ),
                ));
                continue;
            }
            let uuid = vm.uuid.as_str();
            let node_key = domain::vm_key(uuid, VmField::Node);
            let state_key = domain::vm_key(uuid, VmField::State);
            if vm.metadata.migration_method == MigrationMethod::None {
                let t = TxnBuilder::new()
                    .mod_revision_is(&state_key, key_revision(keys, VmField::State))
                    .mod_revision_is(&node_key, key_revision(keys, VmField::Node))
                    .put(&state_key, "shutdown")
                    .put(&domain::vm_key(uuid, VmField::FlushedFrom), me.to_string());
                if self.store.txn(t).await?.succeeded() {
                    info!(node = %me, vm = %vm.name, uuid, "flush: migration_method none; shutting the VM down until unflush");
                }
                waiting.push(wait(
                    vm,
                    "shutting down until unflush (migration_method none)".into(),
                ));
                continue;
            }
            match placement::select_target(&vm.metadata, Some(me), records) {
                Ok(target) => {
                    let t = TxnBuilder::new()
                        .mod_revision_is(&state_key, key_revision(keys, VmField::State))
                        .mod_revision_is(&node_key, key_revision(keys, VmField::Node))
                        .put(&node_key, target.clone())
                        .put(&state_key, "migrate");
                    if self.store.txn(t).await?.succeeded() {
                        info!(node = %me, vm = %vm.name, uuid, target = %target, method = %vm.metadata.migration_method, "flush: migrating the VM away");
                    }
                    waiting.push(wait(vm, format!("migration to {target} requested")));
                }
                Err(e) => {
                    if self.warn_once(uuid) {
                        warn!(node = %me, vm = %vm.name, uuid, reason = %e, "flush: no node can take the VM; it keeps running here");
                    }
                    waiting.push(wait(vm, format!("keeps running here: {e}")));
                }
            }
        }
        if remaining > 0 {
            self.report(DomainState::Flush, waiting, remaining).await;
            return Ok(Some(DomainState::Flush));
        }
        let r = self
            .advance(
                DomainState::Flush,
                DomainState::Flushed,
                "every VM moved off",
            )
            .await?;
        if r.is_some() {
            self.report(DomainState::Flushed, Vec::new(), 0).await;
        }
        Ok(r)
    }

    async fn unflush(
        &self,
        vms: &[(Vm, BTreeMap<String, KeyEntry>)],
    ) -> Result<Option<DomainState>, StoreError> {
        let me = self.node.as_str();
        let mut remaining = 0usize;
        let mut waiting = Vec::new();
        let wait = |vm: &Vm, reason: &str| DrainWait {
            uuid: vm.uuid.clone(),
            name: vm.name.clone(),
            reason: reason.to_string(),
        };
        for (vm, keys) in vms {
            let uuid = vm.uuid.as_str();
            let state_key = domain::vm_key(uuid, VmField::State);
            if vm.flushed_from.as_deref() == Some(me) {
                remaining += 1;
                waiting.push(wait(vm, "starting again here"));
                let t = TxnBuilder::new()
                    .mod_revision_is(&state_key, key_revision(keys, VmField::State))
                    .put(&state_key, "start")
                    .delete(&domain::vm_key(uuid, VmField::FlushedFrom));
                if self.store.txn(t).await?.succeeded() {
                    info!(node = %me, vm = %vm.name, uuid, "unflush: starting the VM the flush shut down");
                }
                continue;
            }
            let away = vm.last_node.as_deref() == Some(me) && vm.node.as_deref() != Some(me);
            if !away {
                continue;
            }
            match vm.state {
                DesiredState::Start => {
                    remaining += 1;
                    waiting.push(wait(vm, "coming back (unmigrate requested)"));
                    let t = TxnBuilder::new()
                        .mod_revision_is(&state_key, key_revision(keys, VmField::State))
                        .put(&state_key, "unmigrate");
                    if self.store.txn(t).await?.succeeded() {
                        info!(node = %me, vm = %vm.name, uuid, "unflush: bringing the VM back");
                    }
                }
                DesiredState::Migrate | DesiredState::MigrateLive | DesiredState::Unmigrate => {
                    remaining += 1; // on its way
                    waiting.push(wait(vm, &format!("{} in progress", vm.state)));
                }
                _ => {} // stopped meanwhile: stays where it is
            }
        }
        if remaining > 0 {
            self.report(DomainState::Unflush, waiting, remaining).await;
            return Ok(Some(DomainState::Unflush));
        }
        let r = self
            .advance(DomainState::Unflush, DomainState::Ready, "every VM is back")
            .await?;
        if r.is_some() {
            self.report(DomainState::Ready, Vec::new(), 0).await;
        }
        Ok(r)
    }

    /// Move `domain_state` from `from` to `to` unless someone changed it meanwhile
    /// (`Ok(None)` then).
    pub async fn advance(
        &self,
        from: DomainState,
        to: DomainState,
        why: &str,
    ) -> Result<Option<DomainState>, StoreError> {
        let key = schema::node_key(&self.node, NodeField::DomainState);
        let t = TxnBuilder::new()
            .value_is(&key, from.as_str())
            .put(&key, to.as_str());
        if self.store.txn(t).await?.succeeded() {
            info!(node = %self.node, from = %from, to = %to, reason = why, "domain_state changed");
            Ok(Some(to))
        } else {
            Ok(None)
        }
    }
}
