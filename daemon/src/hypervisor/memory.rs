//! [`MemoryHypervisor`]: an in-memory [`Hypervisor`], only for unit-testing the Domain
//! planner and state machine (crash handling, ACPI timeouts, migration bookkeeping) without
//! libvirt. It is not a model of libvirt to test against: the real driver is tested against
//! real libvirt (`test:///default` and `qemu:///system`).
//!
//! It follows the same contract as [`Libvirt`](super::Libvirt): the same input checks and
//! error shapes, the same idempotency, lifecycle events on subscribers. Knobs let tests
//! inject what real hosts do: a guest that ignores ACPI, a qemu that dies, a failing call;
//! [`peer`](MemoryHypervisor::peer) makes a second host for migrations.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::mpsc;

use super::error::{DomainRef, ErrorKind, HypervisorError};
use super::events::EVENT_QUEUE;
use super::types::{
    DomainEvent, DomainInfo, DomainState, DomainStats, Lifecycle, MigrateOptions, Op, Outcome,
    StopReason,
};
use super::xml::{check_uuid, parse_domain_xml};
use super::Hypervisor;

#[derive(Debug, Clone)]
struct MemDomain {
    name: String,
    xml: String,
    persistent: bool,
    autostart: bool,
    state: DomainState,
    reason: String,
    vcpus: u32,
    memory_kib: u64,
    max_memory_kib: u64,
    cpu_time_ns: u64,
    pid: Option<u32>,
    ignores_acpi: bool,
}

#[derive(Debug, Clone)]
struct Fault {
    op: Op,
    uuid: Option<String>,
    message: String,
}

#[derive(Default)]
struct State {
    domains: BTreeMap<String, MemDomain>,
    subscribers: Vec<mpsc::Sender<DomainEvent>>,
    faults: Vec<Fault>,
    calls: Vec<(Op, Option<String>)>,
    next_pid: u32,
}

type Registry = Arc<Mutex<BTreeMap<String, Weak<Mutex<State>>>>>;

/// An in-memory hypervisor for planner and state-machine unit tests (see the module docs).
#[derive(Clone)]
pub struct MemoryHypervisor {
    uri: String,
    state: Arc<Mutex<State>>,
    registry: Registry,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    fn emit(&mut self, uuid: &str, name: &str, event: Lifecycle) {
        let ev = DomainEvent::Lifecycle {
            uuid: uuid.to_string(),
            name: name.to_string(),
            event,
        };
        self.subscribers.retain(|tx| !tx.is_closed());
        for tx in &self.subscribers {
            let _ = tx.try_send(ev.clone());
        }
    }

    /// Take the first injected fault matching `op` (and `uuid`, if the fault names one).
    fn fault(&mut self, op: Op, uuid: Option<&str>) -> Option<String> {
        self.calls.push((op, uuid.map(str::to_string)));
        let i = self
            .faults
            .iter()
            .position(|f| f.op == op && (f.uuid.is_none() || f.uuid.as_deref() == uuid))?;
        Some(self.faults.remove(i).message)
    }

    /// The domain stops: transient ones vanish.
    fn stop(&mut self, uuid: &str, reason: StopReason, state_reason: &str) {
        let Some(d) = self.domains.get_mut(uuid) else {
            return;
        };
        d.state = DomainState::Shutoff;
        d.reason = state_reason.to_string();
        d.pid = None;
        d.cpu_time_ns = 0;
        let name = d.name.clone();
        if !d.persistent {
            self.domains.remove(uuid);
        }
        self.emit(uuid, &name, Lifecycle::Stopped { reason });
    }

    fn info(uuid: &str, d: &MemDomain) -> DomainInfo {
        DomainInfo {
            uuid: uuid.to_string(),
            name: d.name.clone(),
            state: d.state,
            reason: d.reason.clone(),
            persistent: d.persistent,
            autostart: d.autostart,
            vcpus: d.vcpus,
            memory_kib: d.memory_kib,
            max_memory_kib: d.max_memory_kib,
            cpu_time_ns: d.cpu_time_ns,
            pid: d.pid,
        }
    }
}

impl MemoryHypervisor {
    /// An empty host known as `uri` (the URI other in-memory hosts migrate to).
    pub fn new(uri: &str) -> MemoryHypervisor {
        let h = MemoryHypervisor {
            uri: uri.to_string(),
            state: Arc::new(Mutex::new(State {
                next_pid: 1000,
                ..State::default()
            })),
            registry: Arc::new(Mutex::new(BTreeMap::new())),
        };
        h.register();
        h
    }

    /// Another empty host in the same in-memory cluster, reachable by `migrate` as `uri`.
    pub fn peer(&self, uri: &str) -> MemoryHypervisor {
        let h = MemoryHypervisor {
            uri: uri.to_string(),
            state: Arc::new(Mutex::new(State {
                next_pid: 1000,
                ..State::default()
            })),
            registry: self.registry.clone(),
        };
        h.register();
        h
    }

    fn register(&self) {
        lock(&self.registry).insert(self.uri.clone(), Arc::downgrade(&self.state));
    }

    /// The URI this host is known by.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Make the next call of `op` (on `uuid`, or on any domain) fail with `message`.
    pub fn fail_next(&self, op: Op, uuid: Option<&str>, message: &str) {
        lock(&self.state).faults.push(Fault {
            op,
            uuid: uuid.map(str::to_string),
            message: message.to_string(),
        });
    }

    /// Let the guest ignore (or obey) ACPI shutdown requests, like a guest without an OS.
    pub fn set_ignores_acpi(&self, uuid: &str, ignores: bool) {
        if let Some(d) = lock(&self.state).domains.get_mut(uuid) {
            d.ignores_acpi = ignores;
        }
    }

    /// The guest process dies (what `kill -9` of qemu does): shut off with reason
    /// `crashed` and a `Stopped { Failed }` event. Returns whether it was running.
    pub fn kill(&self, uuid: &str) -> bool {
        let mut s = lock(&self.state);
        if !s.domains.get(uuid).is_some_and(|d| d.state.is_active()) {
            return false;
        }
        s.stop(uuid, StopReason::Failed, "crashed");
        true
    }

    /// The guest powers itself off (e.g. `poweroff` inside): `Stopped { Shutdown }`.
    pub fn guest_poweroff(&self, uuid: &str) -> bool {
        let mut s = lock(&self.state);
        if !s.domains.get(uuid).is_some_and(|d| d.state.is_active()) {
            return false;
        }
        s.stop(uuid, StopReason::Shutdown, "shutdown");
        true
    }

    /// Every call so far with its UUID, oldest first (for "was start issued?" assertions).
    pub fn calls(&self) -> Vec<(Op, Option<String>)> {
        lock(&self.state).calls.clone()
    }

    fn err(
        &self,
        op: Op,
        uuid: Option<&str>,
        name: Option<&str>,
        kind: ErrorKind,
        message: String,
    ) -> HypervisorError {
        HypervisorError::Domain {
            uri: self.uri.clone(),
            op,
            domain: DomainRef {
                uuid: uuid.map(str::to_string),
                name: name.map(str::to_string),
            },
            kind,
            message,
        }
    }

    /// Common prologue: validate, record the call, apply an injected fault.
    fn begin(&self, op: Op, uuid: &str) -> Result<MutexGuard<'_, State>, HypervisorError> {
        check_uuid(op, uuid)?;
        let mut s = lock(&self.state);
        if let Some(m) = s.fault(op, Some(uuid)) {
            let name = s.domains.get(uuid).map(|d| d.name.clone());
            return Err(self.err(op, Some(uuid), name.as_deref(), ErrorKind::Other, m));
        }
        Ok(s)
    }

    fn not_found(&self, op: Op, uuid: &str) -> HypervisorError {
        self.err(
            op,
            Some(uuid),
            None,
            ErrorKind::NotFound,
            "no domain with this UUID is defined".into(),
        )
    }

    fn stats_of(uuid: &str, d: &mut MemDomain) -> DomainStats {
        let active = d.state.is_active();
        if active {
            // Time passes for a running guest.
            d.cpu_time_ns = d.cpu_time_ns.saturating_add(10_000_000);
        }
        DomainStats {
            uuid: uuid.to_string(),
            name: d.name.clone(),
            active,
            cpu_time_ns: if active { d.cpu_time_ns } else { 0 },
            memory_kib: d.memory_kib,
            max_memory_kib: d.max_memory_kib,
            vcpus: d.vcpus,
            ..DomainStats::default()
        }
    }
}

impl Hypervisor for MemoryHypervisor {
    async fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError> {
        let mut s = lock(&self.state);
        if let Some(m) = s.fault(Op::List, None) {
            return Err(self.err(Op::List, None, None, ErrorKind::Other, m));
        }
        Ok(s.domains.iter().map(|(u, d)| State::info(u, d)).collect())
    }

    async fn get(&self, uuid: &str) -> Result<Option<DomainInfo>, HypervisorError> {
        let s = self.begin(Op::Get, uuid)?;
        Ok(s.domains.get(uuid).map(|d| State::info(uuid, d)))
    }

    async fn define(&self, xml: &str) -> Result<String, HypervisorError> {
        let x = parse_domain_xml(Op::Define, xml)?;
        let mut s = self.begin(Op::Define, &x.uuid)?;
        if let Some((other, _)) = s
            .domains
            .iter()
            .find(|(u, d)| d.name == x.name && **u != x.uuid)
        {
            return Err(self.err(
                Op::Define,
                Some(&x.uuid),
                Some(&x.name),
                ErrorKind::InvalidDefinition,
                format!("domain '{}' already exists with uuid {other}", x.name),
            ));
        }
        let max = x.max_memory_kib.unwrap_or(0);
        let updated = match s.domains.get_mut(&x.uuid) {
            Some(d) => {
                if d.name != x.name {
                    return Err(self.err(
                        Op::Define,
                        Some(&x.uuid),
                        Some(&x.name),
                        ErrorKind::InvalidDefinition,
                        format!(
                            "domain '{}' is already defined with uuid {}",
                            d.name, x.uuid
                        ),
                    ));
                }
                d.xml = xml.to_string();
                d.persistent = true;
                if !d.state.is_active() {
                    d.vcpus = x.vcpus.unwrap_or(1);
                    d.max_memory_kib = max;
                    d.memory_kib = x.memory_kib.unwrap_or(max);
                }
                true
            }
            None => {
                s.domains.insert(
                    x.uuid.clone(),
                    MemDomain {
                        name: x.name.clone(),
                        xml: xml.to_string(),
                        persistent: true,
                        autostart: false,
                        state: DomainState::Shutoff,
                        reason: "unknown".into(),
                        vcpus: x.vcpus.unwrap_or(1),
                        memory_kib: x.memory_kib.unwrap_or(max),
                        max_memory_kib: max,
                        cpu_time_ns: 0,
                        pid: None,
                        ignores_acpi: false,
                    },
                );
                false
            }
        };
        s.emit(&x.uuid, &x.name, Lifecycle::Defined { updated });
        Ok(x.uuid)
    }

    async fn undefine(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        let mut s = self.begin(Op::Undefine, uuid)?;
        let Some(d) = s.domains.get_mut(uuid) else {
            return Ok(Outcome::Unchanged);
        };
        if !d.persistent {
            return Ok(Outcome::Unchanged);
        }
        let name = d.name.clone();
        if d.state.is_active() {
            d.persistent = false;
            d.autostart = false;
        } else {
            s.domains.remove(uuid);
        }
        s.emit(uuid, &name, Lifecycle::Undefined);
        Ok(Outcome::Changed)
    }

    async fn start(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        let mut s = self.begin(Op::Start, uuid)?;
        let pid = s.next_pid;
        let Some(d) = s.domains.get_mut(uuid) else {
            return Err(self.not_found(Op::Start, uuid));
        };
        if d.state.is_active() {
            return Ok(Outcome::Unchanged);
        }
        d.state = DomainState::Running;
        d.reason = "booted".into();
        d.pid = Some(pid);
        d.cpu_time_ns = 1;
        let name = d.name.clone();
        s.next_pid = s.next_pid.wrapping_add(1);
        s.emit(
            uuid,
            &name,
            Lifecycle::Started {
                reason: "booted".into(),
            },
        );
        Ok(Outcome::Changed)
    }

    async fn shutdown(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        let mut s = self.begin(Op::Shutdown, uuid)?;
        let Some(d) = s.domains.get(uuid) else {
            return Ok(Outcome::Unchanged);
        };
        if !d.state.is_active() {
            return Ok(Outcome::Unchanged);
        }
        if !d.ignores_acpi {
            s.stop(uuid, StopReason::Shutdown, "shutdown");
        }
        Ok(Outcome::Changed)
    }

    async fn destroy(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        let mut s = self.begin(Op::Destroy, uuid)?;
        if !s.domains.get(uuid).is_some_and(|d| d.state.is_active()) {
            return Ok(Outcome::Unchanged);
        }
        s.stop(uuid, StopReason::Destroyed, "destroyed");
        Ok(Outcome::Changed)
    }

    async fn xml(&self, uuid: &str) -> Result<String, HypervisorError> {
        let s = self.begin(Op::Xml, uuid)?;
        s.domains
            .get(uuid)
            .map(|d| d.xml.clone())
            .ok_or_else(|| self.not_found(Op::Xml, uuid))
    }

    async fn stats(&self, uuid: &str) -> Result<DomainStats, HypervisorError> {
        let mut s = self.begin(Op::Stats, uuid)?;
        match s.domains.get_mut(uuid) {
            Some(d) => Ok(Self::stats_of(uuid, d)),
            None => Err(self.not_found(Op::Stats, uuid)),
        }
    }

    async fn all_stats(&self) -> Result<Vec<DomainStats>, HypervisorError> {
        let mut s = lock(&self.state);
        if let Some(m) = s.fault(Op::Stats, None) {
            return Err(self.err(Op::Stats, None, None, ErrorKind::Other, m));
        }
        Ok(s.domains
            .iter_mut()
            .map(|(u, d)| Self::stats_of(u, d))
            .collect())
    }

    async fn migrate(
        &self,
        uuid: &str,
        dest_uri: &str,
        opts: MigrateOptions,
    ) -> Result<(), HypervisorError> {
        let _ = opts;
        let mut s = self.begin(Op::Migrate, uuid)?;
        let Some(d) = s.domains.get(uuid).cloned() else {
            return Err(self.not_found(Op::Migrate, uuid));
        };
        let fail = |kind, m: String| self.err(Op::Migrate, Some(uuid), Some(&d.name), kind, m);
        if !d.state.is_active() {
            return Err(fail(
                ErrorKind::InvalidOperation,
                "domain is not running; a stopped domain is moved by defining it on the target"
                    .into(),
            ));
        }
        let dest = lock(&self.registry)
            .get(dest_uri)
            .and_then(Weak::upgrade)
            .filter(|st| !Arc::ptr_eq(st, &self.state))
            .ok_or_else(|| {
                fail(
                    ErrorKind::Connection,
                    format!("unable to connect to the destination {dest_uri}"),
                )
            })?;
        {
            let mut t = lock(&dest);
            if t.domains.get(uuid).is_some_and(|x| x.state.is_active()) {
                return Err(fail(
                    ErrorKind::InvalidOperation,
                    "the domain is already active on the destination".into(),
                ));
            }
            let pid = t.next_pid;
            t.next_pid = t.next_pid.wrapping_add(1);
            let mut moved = d.clone();
            moved.persistent = true;
            moved.reason = "migrated".into();
            moved.pid = Some(pid);
            t.domains.insert(uuid.to_string(), moved);
            t.emit(uuid, &d.name, Lifecycle::Defined { updated: false });
            t.emit(
                uuid,
                &d.name,
                Lifecycle::Started {
                    reason: "migrated".into(),
                },
            );
        }
        s.domains.remove(uuid);
        s.emit(
            uuid,
            &d.name,
            Lifecycle::Stopped {
                reason: StopReason::Migrated,
            },
        );
        s.emit(uuid, &d.name, Lifecycle::Undefined);
        Ok(())
    }

    async fn events(&self) -> Result<mpsc::Receiver<DomainEvent>, HypervisorError> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        lock(&self.state).subscribers.push(tx);
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U1: &str = "00000000-0000-4000-8000-000000000001";
    const U2: &str = "00000000-0000-4000-8000-000000000002";

    fn xml(name: &str, uuid: &str, mib: u64) -> String {
        format!(
            "<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>\
             <memory unit='MiB'>{mib}</memory><vcpu>1</vcpu></domain>"
        )
    }

    fn drain(rx: &mut mpsc::Receiver<DomainEvent>) -> Vec<Lifecycle> {
        let mut out = vec![];
        while let Ok(DomainEvent::Lifecycle { event, .. }) = rx.try_recv() {
            out.push(event);
        }
        out
    }

    #[tokio::test]
    async fn lifecycle_is_idempotent_and_emits_events() {
        let h = MemoryHypervisor::new("mem://a");
        let mut rx = h.events().await.expect("events");
        assert_eq!(h.define(&xml("vm1", U1, 64)).await.expect("define"), U1);
        assert_eq!(h.define(&xml("vm1", U1, 128)).await.expect("redefine"), U1);
        let i = h.get(U1).await.expect("get").expect("defined");
        assert_eq!((i.state, i.max_memory_kib), (DomainState::Shutoff, 131072));
        assert_eq!(h.start(U1).await.expect("start"), Outcome::Changed);
        assert_eq!(h.start(U1).await.expect("start"), Outcome::Unchanged);
        let pid = h.get(U1).await.expect("get").and_then(|i| i.pid);
        assert!(pid.is_some());
        assert!(h.stats(U1).await.expect("stats").cpu_time_ns > 0);
        assert_eq!(h.destroy(U1).await.expect("destroy"), Outcome::Changed);
        assert_eq!(h.destroy(U1).await.expect("destroy"), Outcome::Unchanged);
        assert_eq!(h.shutdown(U1).await.expect("shutdown"), Outcome::Unchanged);
        assert_eq!(h.undefine(U1).await.expect("undefine"), Outcome::Changed);
        assert_eq!(h.undefine(U1).await.expect("undefine"), Outcome::Unchanged);
        assert!(h.get(U1).await.expect("get").is_none());
        assert!(h.start(U1).await.expect_err("gone").is_not_found());
        assert_eq!(
            drain(&mut rx),
            vec![
                Lifecycle::Defined { updated: false },
                Lifecycle::Defined { updated: true },
                Lifecycle::Started {
                    reason: "booted".into()
                },
                Lifecycle::Stopped {
                    reason: StopReason::Destroyed
                },
                Lifecycle::Undefined,
            ]
        );
    }

    #[tokio::test]
    async fn acpi_kill_and_faults() {
        let h = MemoryHypervisor::new("mem://a");
        h.define(&xml("vm1", U1, 64)).await.expect("define");
        h.start(U1).await.expect("start");
        h.set_ignores_acpi(U1, true);
        assert_eq!(h.shutdown(U1).await.expect("acpi"), Outcome::Changed);
        assert_eq!(
            h.get(U1).await.expect("get").map(|i| i.state),
            Some(DomainState::Running)
        );
        assert!(h.kill(U1));
        let i = h.get(U1).await.expect("get").expect("persistent");
        assert_eq!(
            (i.state, i.reason.as_str()),
            (DomainState::Shutoff, "crashed")
        );
        h.fail_next(Op::Start, Some(U1), "boom");
        let e = h.start(U1).await.expect_err("injected");
        assert!(
            e.to_string().contains("start domain 'vm1' (") && e.to_string().contains("boom"),
            "{e}"
        );
        assert_eq!(h.start(U1).await.expect("then fine"), Outcome::Changed);
        // The first start, the injected failure, the retry.
        let starts = h.calls().iter().filter(|(op, _)| *op == Op::Start).count();
        assert_eq!(starts, 3);
        let e = h.get("bad").await.expect_err("bad uuid");
        assert!(matches!(e, HypervisorError::InvalidUuid { .. }));
        let e = h.define(&xml("vm1", U2, 64)).await.expect_err("name taken");
        assert_eq!(e.kind(), ErrorKind::InvalidDefinition);
    }

    #[tokio::test]
    async fn transient_domains_vanish_when_stopped() {
        let h = MemoryHypervisor::new("mem://a");
        h.define(&xml("vm1", U1, 64)).await.expect("define");
        h.start(U1).await.expect("start");
        assert_eq!(h.undefine(U1).await.expect("undefine"), Outcome::Changed);
        let i = h.get(U1).await.expect("get").expect("still running");
        assert!(!i.persistent && i.state == DomainState::Running);
        assert_eq!(h.undefine(U1).await.expect("again"), Outcome::Unchanged);
        h.destroy(U1).await.expect("destroy");
        assert!(h.get(U1).await.expect("get").is_none());
    }

    #[tokio::test]
    async fn migrates_between_peers() {
        let a = MemoryHypervisor::new("mem://a");
        let b = a.peer("mem://b");
        let mut rb = b.events().await.expect("events");
        a.define(&xml("vm1", U1, 64)).await.expect("define");
        let e = a
            .migrate(U1, "mem://b", MigrateOptions::default())
            .await
            .expect_err("not running");
        assert_eq!(e.kind(), ErrorKind::InvalidOperation);
        a.start(U1).await.expect("start");
        let e = a
            .migrate(U1, "mem://nowhere", MigrateOptions::default())
            .await
            .expect_err("no such peer");
        assert_eq!(e.kind(), ErrorKind::Connection);
        a.migrate(U1, "mem://b", MigrateOptions::default())
            .await
            .expect("migrate");
        assert!(a.get(U1).await.expect("get").is_none());
        let i = b.get(U1).await.expect("get").expect("moved");
        assert_eq!((i.state, i.persistent), (DomainState::Running, true));
        assert_eq!(
            drain(&mut rb),
            vec![
                Lifecycle::Defined { updated: false },
                Lifecycle::Started {
                    reason: "migrated".into()
                }
            ]
        );
    }
}
