//! [`Libvirt`]: the real [`Hypervisor`], over the `virt` 0.4.3 bindings.
//!
//! libvirt calls block. Each call runs on a thread of its own (not tokio's blocking pool:
//! dropping a runtime waits for its blocking tasks, so one hung libvirt call would hang the
//! daemon's exit) under a timeout, holding one permit of a small semaphore: a hung libvirtd
//! costs at most [`MAX_CONCURRENT_CALLS`] threads, never the runtime, the lease or the
//! keepalive. One connection is shared by all calls (libvirt connections are thread-safe);
//! one that times out or breaks is abandoned and closed once its last call has returned, and
//! while libvirt does not answer calls are refused at once until a cheap probe answers (see
//! the `conn` module: why call connections have no libvirt keepalive). The outage and its
//! end are logged once each, not once per call.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{info, warn};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

use super::conn::{lock, Admit, Connections, Outage};
use super::error::{DomainRef, ErrorKind, HypervisorError};
use super::events;
use super::stats::RecordList;
use super::types::{
    DomainEvent, DomainInfo, DomainState, DomainStats, MigrateOptions, Op, Outcome,
};
use super::xml::{check_uuid, parse_domain_xml};
use super::{Hypervisor, Probe};

/// Most libvirt calls in flight at once per [`Libvirt`] handle.
pub const MAX_CONCURRENT_CALLS: usize = 16;

/// Most probes (while libvirt is not answering) in flight at once; separate from the call
/// permits, so calls stuck in a hung libvirtd cannot keep the probe from noticing its return.
pub const MAX_CONCURRENT_PROBES: usize = 2;

/// How long a probe may take before libvirt counts as still not answering (at most the
/// call timeout). The probe keeps running: its late answer still ends the outage.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Least time given to `start` and `destroy`: booting a large guest and libvirt's
/// SIGTERM-then-SIGKILL of a stuck qemu both take longer than a routine call.
pub const MIN_SLOW_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the QEMU system driver keeps its pid files.
pub const QEMU_SYSTEM_RUN_DIR: &str = "/run/libvirt/qemu";

/// Flags for `undefine`, most complete first: drivers refuse flags they do not know (the
/// test driver knows only the first two), so each refusal retries with the next set.
const UNDEFINE_FLAGS: [u32; 3] = [
    sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | sys::VIR_DOMAIN_UNDEFINE_NVRAM,
    sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
    0,
];

/// A libvirt connection URI plus a shared, self-healing connection to it.
///
/// Cheap to clone (all clones share the connection). [`Libvirt::new`] also registers
/// libvirt's event loop, which must precede every connection for events to work.
#[derive(Clone)]
pub struct Libvirt {
    inner: Arc<Inner>,
}

struct Inner {
    uri: String,
    timeout: Duration,
    conns: Connections,
    outage: Mutex<Outage>,
    permits: Arc<Semaphore>,
    probe_permits: Arc<Semaphore>,
    qemu_run_dir: Option<PathBuf>,
    /// Ask libvirt to validate definitions against its schema.
    validate: bool,
}

impl Inner {
    fn new(
        uri: &str,
        timeout: Duration,
        permits: Arc<Semaphore>,
        qemu_run_dir: Option<PathBuf>,
        validate: bool,
    ) -> Inner {
        Inner {
            uri: uri.to_string(),
            timeout,
            conns: Connections::new(uri),
            outage: Mutex::new(Outage::default()),
            permits,
            probe_permits: Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES)),
            qemu_run_dir,
            validate,
        }
    }

    /// A probe returned (on its own thread, maybe after its caller gave up): an answer ends
    /// the outage, logged once.
    fn probed(&self, id: u64, error: Option<(ErrorKind, &str)>) {
        let ended = lock(&self.outage).probed(Instant::now(), id, error);
        if let Some(lasted) = ended {
            info!(uri = %self.uri, outage_ms = lasted.as_millis() as u64, "libvirt answering again");
        }
    }

    /// The cheap probe: one RPC (`virConnectGetLibVersion`) on the shared connection,
    /// opened first if it was abandoned. A broken connection is abandoned.
    fn probe_once(&self, used: &AtomicU64) -> Result<(), (ErrorKind, String)> {
        let lease = self
            .conns
            .lease()
            .map_err(|e| (ErrorKind::Connection, e.message().to_string()))?;
        used.store(lease.id(), Ordering::Relaxed);
        match lease.conn().get_lib_version() {
            Ok(_) => Ok(()),
            Err(e) => {
                let kind = ErrorKind::of(&e);
                if kind == ErrorKind::Connection {
                    self.conns.abandon(lease.id());
                }
                Err((kind, e.message().to_string()))
            }
        }
    }
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

/// Is `uri` the local QEMU system driver (whose pid files we can read)?
fn is_local_qemu_system(uri: &str) -> bool {
    let Some(rest) = uri
        .strip_prefix("qemu:///system")
        .or_else(|| uri.strip_prefix("qemu+unix:///system"))
    else {
        return false;
    };
    // A custom socket may belong to another libvirtd (another mount namespace).
    rest.is_empty() || (rest.starts_with('?') && !rest.contains("socket="))
}

/// PID of the qemu process of an active domain: `<run_dir>/<name>.pid`, trusted only if
/// `/proc/<pid>/cmdline` carries `-uuid <uuid>` (a stale file or a reused PID fails that).
pub fn qemu_pid(run_dir: &Path, name: &str, uuid: &str) -> Option<u32> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    let text = std::fs::read_to_string(run_dir.join(format!("{name}.pid"))).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(a) = args.next() {
        if a == b"-uuid" {
            let v = args.next()?;
            return v.eq_ignore_ascii_case(uuid.as_bytes()).then_some(pid);
        }
    }
    None
}

/// Why [`run_bounded`] has no result.
enum Bounded {
    /// Still running after the timeout (it finishes, or hangs, on its own thread).
    TimedOut,
    /// The thread could not be started or died.
    Lost(String),
}

/// Run blocking `f` on a new thread once a permit of `permits` is free, and wait at most
/// `timeout` (permit wait included). `f` returns its result and what to drop only after the
/// result is sent (a connection lease: dropping the last one closes the connection). The
/// permit is held until then, so hung calls keep their permits and bound the number of
/// stuck threads.
async fn run_bounded<T, L, F>(
    permits: &Arc<Semaphore>,
    timeout: Duration,
    f: F,
) -> Result<T, Bounded>
where
    T: Send + 'static,
    L: Send + 'static,
    F: FnOnce() -> (T, L) + Send + 'static,
{
    let permits = permits.clone();
    let work = async move {
        let permit = permits
            .acquire_owned()
            .await
            .map_err(|_| Bounded::Lost("libvirt call permits closed".into()))?;
        let (tx, rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("libvirt-call".into())
            .spawn(move || {
                let _permit = permit;
                let (result, leftover) = f();
                let _ = tx.send(result);
                drop(leftover);
            })
            .map_err(|e| Bounded::Lost(format!("cannot start a libvirt call thread: {e}")))?;
        rx.await
            .map_err(|_| Bounded::Lost("the libvirt call thread died".into()))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Bounded::TimedOut),
    }
}

/// The context of one libvirt call: the connection and what the error should name.
struct Call<'a> {
    inner: &'a Inner,
    conn: &'a Connect,
    /// Which shared connection `conn` is (to abandon it).
    conn_id: u64,
    op: Op,
    domain: DomainRef,
}

impl Call<'_> {
    /// Turn a libvirt error into ours; abandon the connection if it broke.
    fn fail(&self, e: virt::error::Error) -> HypervisorError {
        let kind = ErrorKind::of(&e);
        if kind == ErrorKind::Connection {
            self.inner.conns.abandon(self.conn_id);
        }
        self.error(kind, e.message().to_string())
    }

    /// Like [`fail`](Self::fail) for a failed migration, naming the destination. libvirt
    /// reports trouble reaching the destination's libvirtd as an RPC error: while our own
    /// connection is alive that is not a broken connection here, so it is kept and the
    /// error is `Other`, not `Connection`.
    fn fail_migration(&self, e: virt::error::Error, dest: &str) -> HypervisorError {
        let kind = match ErrorKind::of(&e) {
            ErrorKind::Connection if self.conn.is_alive().unwrap_or(false) => ErrorKind::Other,
            k => k,
        };
        if kind == ErrorKind::Connection {
            self.inner.conns.abandon(self.conn_id);
        }
        self.error(kind, format!("to {dest}: {}", e.message()))
    }

    fn error(&self, kind: ErrorKind, message: String) -> HypervisorError {
        HypervisorError::Domain {
            uri: self.inner.uri.clone(),
            op: self.op,
            domain: self.domain.clone(),
            kind,
            message,
        }
    }

    /// The domain with `uuid`, `None` if there is none; records its name for errors.
    fn lookup(&mut self, uuid: &str) -> Result<Option<Domain>, HypervisorError> {
        match Domain::lookup_by_uuid_string(self.conn, uuid) {
            Ok(d) => {
                self.domain.name = d.get_name().ok();
                Ok(Some(d))
            }
            Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Like [`lookup`](Self::lookup) but "no such domain" is an error.
    fn require(&mut self, uuid: &str) -> Result<Domain, HypervisorError> {
        self.lookup(uuid)?.ok_or_else(|| {
            self.error(
                ErrorKind::NotFound,
                "no domain with this UUID is defined".into(),
            )
        })
    }

    fn is_active(&self, d: &Domain) -> Result<bool, HypervisorError> {
        d.is_active().map_err(|e| self.fail(e))
    }

    /// Snapshot of one domain.
    fn describe(&self, d: &Domain) -> Result<DomainInfo, virt::error::Error> {
        let uuid = d.get_uuid_string()?.to_ascii_lowercase();
        let name = d.get_name()?;
        let (state, reason) = d.get_state()?;
        let state = DomainState::from_raw(state as i32);
        let info = d.get_info()?;
        let persistent = d.is_persistent()?;
        let autostart = if persistent {
            d.get_autostart()?
        } else {
            false
        };
        let pid = if state.is_active() {
            self.inner
                .qemu_run_dir
                .as_deref()
                .and_then(|dir| qemu_pid(dir, &name, &uuid))
        } else {
            None
        };
        Ok(DomainInfo {
            reason: state.reason_name(reason),
            uuid,
            name,
            state,
            persistent,
            autostart,
            vcpus: info.nr_virt_cpu,
            memory_kib: info.memory,
            max_memory_kib: info.max_mem,
            cpu_time_ns: if state.is_active() { info.cpu_time } else { 0 },
            pid,
        })
    }
}

impl Libvirt {
    /// A handle for `uri`; nothing is opened until the first call. `timeout` bounds each
    /// call (see [`MIN_SLOW_CALL_TIMEOUT`] and [`MigrateOptions::timeout`] for the slow
    /// ones). Registers libvirt's event loop first (once per process).
    pub fn new(uri: &str, timeout: Duration) -> Libvirt {
        if let Err(e) = events::ensure_event_loop() {
            warn!(error = %e, "libvirt event loop unavailable; domain events will not work");
        }
        let qemu_run_dir = is_local_qemu_system(uri).then(|| PathBuf::from(QEMU_SYSTEM_RUN_DIR));
        Libvirt {
            inner: Arc::new(Inner::new(
                uri,
                timeout,
                Arc::new(Semaphore::new(MAX_CONCURRENT_CALLS)),
                qemu_run_dir,
                false,
            )),
        }
    }

    /// Read qemu pid files from `dir` instead (e.g. a libvirtd with its own run directory
    /// in a mount namespace), or `None` to report no PIDs.
    pub fn with_qemu_run_dir(self, dir: Option<PathBuf>) -> Libvirt {
        Libvirt {
            inner: Arc::new(Inner::new(
                &self.inner.uri,
                self.inner.timeout,
                self.inner.permits.clone(),
                dir,
                self.inner.validate,
            )),
        }
    }

    /// Have libvirt validate every definition against its RNG schema
    /// (`VIR_DOMAIN_DEFINE_VALIDATE`): unknown elements are refused instead of ignored, at
    /// the price of libvirt re-reading its schema per define (≈9 ms of CPU each here).
    pub fn with_validation(self, validate: bool) -> Libvirt {
        Libvirt {
            inner: Arc::new(Inner::new(
                &self.inner.uri,
                self.inner.timeout,
                self.inner.permits.clone(),
                self.inner.qemu_run_dir.clone(),
                validate,
            )),
        }
    }

    /// The URI.
    pub fn uri(&self) -> &str {
        &self.inner.uri
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Run `f` with a lease on the shared connection on a call thread, bounded by `timeout`
    /// (which also covers waiting for a permit). Refused at once while libvirt is not
    /// answering (unless a probe finds it back first); a timeout abandons the connection the
    /// call was using and, like a broken connection, starts an outage.
    async fn call<T, F>(
        &self,
        op: Op,
        domain: DomainRef,
        timeout: Duration,
        f: F,
    ) -> Result<T, HypervisorError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Call<'_>) -> Result<T, HypervisorError> + Send + 'static,
    {
        self.admit(op, &domain).await?;
        let inner = self.inner.clone();
        let dom = domain.clone();
        let used = Arc::new(AtomicU64::new(0));
        let used_here = used.clone();
        let r = run_bounded(&self.inner.permits, timeout, move || {
            let lease = match inner.conns.lease() {
                Ok(l) => l,
                Err(e) => {
                    let err = HypervisorError::Domain {
                        uri: inner.uri.clone(),
                        op,
                        domain: dom,
                        kind: ErrorKind::Connection,
                        message: e.message().to_string(),
                    };
                    return (Err(err), None);
                }
            };
            used_here.store(lease.id(), Ordering::Relaxed);
            let mut call = Call {
                inner: &inner,
                conn: lease.conn(),
                conn_id: lease.id(),
                op,
                domain: dom,
            };
            let r = f(&mut call);
            // The lease goes after the result is sent (closing may be an RPC).
            (r, Some(lease))
        })
        .await;
        let r = match r {
            Ok(r) => r,
            Err(Bounded::TimedOut) => {
                // Still running (or waiting to open): new calls get a fresh connection.
                let id = used.load(Ordering::Relaxed);
                if id != 0 {
                    self.inner.conns.abandon(id);
                }
                Err(HypervisorError::DomainTimeout {
                    uri: self.inner.uri.clone(),
                    op,
                    domain,
                    timeout,
                })
            }
            Err(Bounded::Lost(why)) => Err(HypervisorError::Domain {
                uri: self.inner.uri.clone(),
                op,
                domain,
                kind: ErrorKind::Other,
                message: why,
            }),
        };
        if let Err(e) = &r {
            self.note_failure(op, timeout, e);
        }
        r
    }

    /// Start an outage (logged once) if `e` says libvirt did not answer: a timeout (except
    /// of a migration, whose job may just be long) or a broken connection.
    fn note_failure(&self, op: Op, timeout: Duration, e: &HypervisorError) {
        let unanswered = match e.kind() {
            ErrorKind::Timeout => op != Op::Migrate,
            ErrorKind::Connection => true,
            _ => false,
        };
        if !unanswered {
            return;
        }
        let message = e.to_string();
        if lock(&self.inner.outage).failed(Instant::now(), e.kind(), &message) {
            warn!(uri = %self.inner.uri, op = op.as_str(), timeout_ms = timeout.as_millis() as u64,
                error = %message, "libvirt not answering");
        }
    }

    /// Let a call through, or refuse it while libvirt is not answering. When a probe is due
    /// this call runs it first (bounded by [`PROBE_TIMEOUT`]) and goes ahead if it answered.
    async fn admit(&self, op: Op, domain: &DomainRef) -> Result<(), HypervisorError> {
        // Of the kind of the failure that keeps libvirt down (a timeout, a broken connection),
        // so callers treat a refused call like the failure it stands for.
        let refused = |kind: ErrorKind, last: String| {
            let down_for = lock(&self.inner.outage)
                .down_for(Instant::now())
                .unwrap_or(Duration::ZERO);
            HypervisorError::Domain {
                uri: self.inner.uri.clone(),
                op,
                domain: domain.clone(),
                kind,
                message: format!(
                    "libvirt not answering for {:.1}s (last error: {last}); {}",
                    down_for.as_secs_f64(),
                    "calls are refused until it answers a probe"
                ),
            }
        };
        // A statement of its own: the guard must be gone before `refused` locks again.
        let decision = lock(&self.inner.outage).admit(Instant::now());
        let id = match decision {
            Admit::Go => return Ok(()),
            Admit::Refuse(_, kind, last) => return Err(refused(kind, last)),
            Admit::Probe(id) => id,
        };
        let inner = self.inner.clone();
        let used = Arc::new(AtomicU64::new(0));
        let used_here = used.clone();
        let timeout = PROBE_TIMEOUT.min(self.inner.timeout);
        let r = run_bounded(&self.inner.probe_permits, timeout, move || {
            let r = inner.probe_once(&used_here);
            // Recorded here, not by the caller: a late answer still ends the outage.
            inner.probed(id, r.as_ref().err().map(|(k, m)| (*k, m.as_str())));
            (r, ())
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err((kind, e))) => Err(refused(kind, e)),
            Err(Bounded::Lost(e)) => Err(refused(ErrorKind::Other, e)),
            Err(Bounded::TimedOut) => {
                let id = used.load(Ordering::Relaxed);
                if id != 0 {
                    self.inner.conns.abandon(id);
                }
                // The probe's thread records nothing until it returns.
                let e = HypervisorError::DomainTimeout {
                    uri: self.inner.uri.clone(),
                    op: Op::Probe,
                    domain: DomainRef::none(),
                    timeout,
                };
                self.note_failure(Op::Probe, timeout, &e);
                Err(refused(ErrorKind::Timeout, e.to_string()))
            }
        }
    }

    fn slow_timeout(&self) -> Duration {
        self.inner.timeout.max(MIN_SLOW_CALL_TIMEOUT)
    }

    /// Probe libvirt: read version and domain counts on the shared connection (opened if
    /// needed). The keepalive calls this every tick.
    pub async fn probe(&self) -> Result<Probe, HypervisorError> {
        let r = self
            .call(Op::Probe, DomainRef::none(), self.inner.timeout, |c| {
                let get = || -> Result<Probe, virt::error::Error> {
                    Ok(Probe {
                        version: version_string(c.conn.get_lib_version()?),
                        running: c.conn.num_of_domains()?,
                        defined: c.conn.num_of_defined_domains()?,
                    })
                };
                get().map_err(|e| c.fail(e))
            })
            .await;
        r.map_err(|e| match e {
            HypervisorError::DomainTimeout { uri, timeout, .. } => {
                HypervisorError::Timeout { uri, timeout }
            }
            HypervisorError::Domain { uri, message, .. } => {
                HypervisorError::Libvirt { uri, message }
            }
            e => e,
        })
    }

    /// Close the shared connection (daemon shutdown): at once if no call runs on it (giving
    /// up after the call timeout if libvirt hangs), else when the last call returns. A later
    /// call opens a new one.
    pub async fn close(&self) {
        let Some(mut c) = self.inner.conns.take() else {
            return;
        };
        let _ = run_bounded(&self.inner.permits, self.inner.timeout, move || {
            let _ = c.close();
            ((), ())
        })
        .await;
    }

    /// Every domain. Domains that vanish while being listed are left out.
    pub async fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError> {
        self.call(Op::List, DomainRef::none(), self.inner.timeout, |c| {
            let doms = c.conn.list_all_domains(0).map_err(|e| c.fail(e))?;
            let mut out = Vec::with_capacity(doms.len());
            for d in &doms {
                match c.describe(d) {
                    Ok(i) => out.push(i),
                    Err(e) if e.code() == ErrorNumber::NoDomain => {}
                    Err(e) => {
                        let c2 = Call {
                            inner: c.inner,
                            conn: c.conn,
                            conn_id: c.conn_id,
                            op: c.op,
                            domain: DomainRef {
                                uuid: d.get_uuid_string().ok(),
                                name: d.get_name().ok(),
                            },
                        };
                        return Err(c2.fail(e));
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// The domain with `uuid`, or `None`.
    pub async fn get(&self, uuid: &str) -> Result<Option<DomainInfo>, HypervisorError> {
        let uuid = check_uuid(Op::Get, uuid)?.to_string();
        self.call(
            Op::Get,
            DomainRef::uuid(&uuid),
            self.inner.timeout,
            move |c| {
                let Some(d) = c.lookup(&uuid)? else {
                    return Ok(None);
                };
                match c.describe(&d) {
                    Ok(i) => Ok(Some(i)),
                    Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
                    Err(e) => Err(c.fail(e)),
                }
            },
        )
        .await
    }

    /// Define `xml` persistently (schema-validated by libvirt when
    /// [`Libvirt::with_validation`] asked for it); returns its UUID.
    pub async fn define(&self, xml: &str) -> Result<String, HypervisorError> {
        let parsed = parse_domain_xml(Op::Define, xml)?;
        let domain = DomainRef {
            uuid: Some(parsed.uuid.clone()),
            name: Some(parsed.name.clone()),
        };
        let xml = xml.to_string();
        let flags = if self.inner.validate {
            sys::VIR_DOMAIN_DEFINE_VALIDATE
        } else {
            0
        };
        self.call(Op::Define, domain, self.inner.timeout, move |c| {
            let defined = match Domain::define_xml_flags(c.conn, &xml, flags) {
                Err(e) if e.code() == ErrorNumber::InvalidArg && e.message().contains("flags") => {
                    Domain::define_xml(c.conn, &xml)
                }
                r => r,
            }
            .map_err(|e| c.fail(e))?;
            let uuid = defined
                .get_uuid_string()
                .map_err(|e| c.fail(e))?
                .to_ascii_lowercase();
            Ok(uuid)
        })
        .await
    }

    /// Remove the persistent definition (with managed save, snapshot/checkpoint metadata
    /// and NVRAM). No domain, or a transient one: `Unchanged`. An active domain keeps
    /// running, transient, until stopped.
    pub async fn undefine(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        let uuid = check_uuid(Op::Undefine, uuid)?.to_string();
        self.call(
            Op::Undefine,
            DomainRef::uuid(&uuid),
            self.inner.timeout,
            move |c| {
                let Some(d) = c.lookup(&uuid)? else {
                    return Ok(Outcome::Unchanged);
                };
                match d.is_persistent() {
                    Ok(false) => return Ok(Outcome::Unchanged),
                    Ok(true) => {}
                    Err(e) if e.code() == ErrorNumber::NoDomain => return Ok(Outcome::Unchanged),
                    Err(e) => return Err(c.fail(e)),
                }
                let mut last = None;
                for flags in UNDEFINE_FLAGS {
                    match d.undefine_flags(flags) {
                        Ok(()) => return Ok(Outcome::Changed),
                        Err(e) if e.code() == ErrorNumber::NoDomain => {
                            return Ok(Outcome::Unchanged)
                        }
                        Err(e)
                            if e.code() == ErrorNumber::InvalidArg
                                && e.message().contains("flags") =>
                        {
                            last = Some(e)
                        }
                        Err(e) => return Err(c.fail(e)),
                    }
                }
                Err(match last {
                    Some(e) => c.fail(e),
                    None => c.error(ErrorKind::Other, "undefine refused".into()),
                })
            },
        )
        .await
    }

    /// Boot the domain. Already active (running, paused…): `Unchanged`.
    pub async fn start(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        let uuid = check_uuid(Op::Start, uuid)?.to_string();
        self.call(
            Op::Start,
            DomainRef::uuid(&uuid),
            self.slow_timeout(),
            move |c| {
                let d = c.require(&uuid)?;
                // No "is it running?" round trip first: libvirt refuses to start a running
                // domain (OperationInvalid from qemu, InternalError from the test driver),
                // and any refusal is then checked against the domain's state.
                match d.create() {
                    Ok(_) => Ok(Outcome::Changed),
                    Err(_) if c.is_active(&d)? => Ok(Outcome::Unchanged),
                    Err(e) => Err(c.fail(e)),
                }
            },
        )
        .await
    }

    /// A power operation on an active domain: absent or inactive is `Unchanged`, and so is
    /// libvirt saying "not running" when the domain indeed went down meanwhile.
    async fn power<F>(
        &self,
        op: Op,
        uuid: &str,
        timeout: Duration,
        act: F,
    ) -> Result<Outcome, HypervisorError>
    where
        F: FnOnce(&Domain) -> Result<(), virt::error::Error> + Send + 'static,
    {
        let uuid = check_uuid(op, uuid)?.to_string();
        self.call(op, DomainRef::uuid(&uuid), timeout, move |c| {
            let Some(d) = c.lookup(&uuid)? else {
                return Ok(Outcome::Unchanged);
            };
            if !c.is_active(&d)? {
                return Ok(Outcome::Unchanged);
            }
            match act(&d) {
                Ok(()) => Ok(Outcome::Changed),
                Err(e)
                    if matches!(
                        e.code(),
                        ErrorNumber::OperationInvalid | ErrorNumber::NoDomain
                    ) && !d.is_active().unwrap_or(true) =>
                {
                    Ok(Outcome::Unchanged)
                }
                Err(e) => Err(c.fail(e)),
            }
        })
        .await
    }

    /// Press the ACPI power button (drivers without ACPI get their default shutdown). The
    /// guest may ignore it: the caller destroys after its own timeout. Not active or not
    /// defined: `Unchanged`.
    pub async fn shutdown(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        self.power(Op::Shutdown, uuid, self.inner.timeout, |d| {
            match d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN) {
                Err(e) if e.code() == ErrorNumber::InvalidArg && e.message().contains("flags") => {
                    d.shutdown().map(|_| ())
                }
                r => r.map(|_| ()),
            }
        })
        .await
    }

    /// Power off now (libvirt sends SIGTERM, then SIGKILL). Not active or not defined:
    /// `Unchanged`.
    pub async fn destroy(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        self.power(Op::Destroy, uuid, self.slow_timeout(), |d| d.destroy())
            .await
    }

    /// Pause a running domain (self-fence with `fencing.self_fence_action: pause`). Not
    /// active or not defined: `Unchanged`.
    pub async fn suspend(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        self.power(Op::Suspend, uuid, self.inner.timeout, |d| {
            d.suspend().map(|_| ())
        })
        .await
    }

    /// The domain's current XML (live definition while running; no secrets).
    pub async fn xml(&self, uuid: &str) -> Result<String, HypervisorError> {
        let uuid = check_uuid(Op::Xml, uuid)?.to_string();
        self.call(
            Op::Xml,
            DomainRef::uuid(&uuid),
            self.inner.timeout,
            move |c| {
                let d = c.require(&uuid)?;
                d.get_xml_desc(0).map_err(|e| c.fail(e))
            },
        )
        .await
    }

    /// Counters of one domain (zeros while shut off).
    pub async fn stats(&self, uuid: &str) -> Result<DomainStats, HypervisorError> {
        let uuid = check_uuid(Op::Stats, uuid)?.to_string();
        self.call(
            Op::Stats,
            DomainRef::uuid(&uuid),
            self.inner.timeout,
            move |c| {
                let d = c.require(&uuid)?;
                let active = c.is_active(&d)?;
                let record = match RecordList::one(&d) {
                    Ok(list) => list.records().into_iter().next(),
                    Err(e) if e.code() == ErrorNumber::NoSupport => None,
                    Err(e) => return Err(c.fail(e)),
                };
                let info = d.get_info().map_err(|e| c.fail(e))?;
                let record = record.unwrap_or_else(|| super::stats::Record {
                    uuid: uuid.clone(),
                    name: c.domain.name.clone().unwrap_or_default(),
                    parsed: Default::default(),
                });
                Ok(zero_if_inactive(record.into_stats(active, Some(&info))))
            },
        )
        .await
    }

    /// Counters of every domain in one bulk call (`virConnectGetAllDomainStats`), for the
    /// keepalive. Drivers that leave fields out get them from `virDomainGetInfo`.
    pub async fn all_stats(&self) -> Result<Vec<DomainStats>, HypervisorError> {
        self.call(Op::Stats, DomainRef::none(), self.inner.timeout, |c| {
            let list = RecordList::all(c.conn).map_err(|e| c.fail(e))?;
            let mut out = Vec::new();
            for r in list.records() {
                let complete = r.parsed.cpu_time_ns.is_some() && r.parsed.vcpus.is_some();
                let (active, info) = match r.parsed.state {
                    Some(s) if complete => (DomainState::from_raw(s).is_active(), None),
                    // The driver left counters out: one more call for this domain.
                    _ => match Domain::lookup_by_uuid_string(c.conn, &r.uuid) {
                        Ok(d) => (d.is_active().unwrap_or(false), d.get_info().ok()),
                        Err(_) => continue, // vanished meanwhile
                    },
                };
                out.push(zero_if_inactive(r.into_stats(active, info.as_ref())));
            }
            Ok(out)
        })
        .await
    }

    /// Peer-to-peer migration to `dest_uri` (as libvirtd there reaches it), persistent there
    /// and undefined here. On timeout the libvirt job is aborted.
    pub async fn migrate(
        &self,
        uuid: &str,
        dest_uri: &str,
        opts: MigrateOptions,
    ) -> Result<(), HypervisorError> {
        let uuid = check_uuid(Op::Migrate, uuid)?.to_string();
        let domain = DomainRef::uuid(&uuid);
        if dest_uri.is_empty() || dest_uri.contains('\0') {
            return Err(HypervisorError::Domain {
                uri: self.inner.uri.clone(),
                op: Op::Migrate,
                domain,
                kind: ErrorKind::InvalidInput,
                message: format!("invalid destination URI {dest_uri:?}"),
            });
        }
        let dest = dest_uri.to_string();
        let u = uuid.clone();
        let o = opts.clone();
        let r = self
            .call(Op::Migrate, domain.clone(), opts.timeout, move |c| {
                let d = c.require(&u)?;
                if !c.is_active(&d)? {
                    return Err(c.error(
                        ErrorKind::InvalidOperation,
                        "domain is not running; a stopped domain is moved by defining it on the target".into(),
                    ));
                }
                if let Some(ms) = o.max_downtime_ms {
                    d.migrate_set_max_downtime(ms, 0).map_err(|e| c.fail(e))?;
                }
                let mut flags = sys::VIR_MIGRATE_PEER2PEER
                    | sys::VIR_MIGRATE_PERSIST_DEST
                    | sys::VIR_MIGRATE_UNDEFINE_SOURCE;
                if o.live {
                    flags |= sys::VIR_MIGRATE_LIVE;
                }
                let params = virt::domain::MigrateParameters {
                    bandwidth: o.bandwidth_mib_s,
                    ..Default::default()
                };
                d.migrate_to_uri3(Some(&dest), params, flags)
                    .map_err(|e| c.fail_migration(e, &dest))
            })
            .await;
        if let Err(HypervisorError::DomainTimeout { .. }) = &r {
            let u = uuid.clone();
            let abort = self
                .call(Op::Migrate, domain, self.inner.timeout, move |c| {
                    if let Some(d) = c.lookup(&u)? {
                        // SAFETY: valid domain.
                        if unsafe { sys::virDomainAbortJob(d.as_ptr()) } < 0 {
                            return Err(c.fail(virt::error::Error::last_error()));
                        }
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = abort {
                warn!(uuid = %uuid, error = %e, "aborting the timed-out migration failed");
            }
        }
        r
    }

    /// Subscribe to lifecycle events of all domains (own thread and connection; see the
    /// `events` module). Resolves once the subscription is registered.
    pub async fn events(&self) -> Result<mpsc::Receiver<DomainEvent>, HypervisorError> {
        events::subscribe(&self.inner.uri, self.inner.timeout).await
    }
}

fn zero_if_inactive(mut s: DomainStats) -> DomainStats {
    if !s.active {
        s.cpu_time_ns = 0;
        s.block_rd_bytes = 0;
        s.block_wr_bytes = 0;
        s.net_rx_bytes = 0;
        s.net_tx_bytes = 0;
    }
    s
}

impl Hypervisor for Libvirt {
    async fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError> {
        Libvirt::list(self).await
    }
    async fn get(&self, uuid: &str) -> Result<Option<DomainInfo>, HypervisorError> {
        Libvirt::get(self, uuid).await
    }
    async fn define(&self, xml: &str) -> Result<String, HypervisorError> {
        Libvirt::define(self, xml).await
    }
    async fn undefine(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        Libvirt::undefine(self, uuid).await
    }
    async fn start(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        Libvirt::start(self, uuid).await
    }
    async fn shutdown(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        Libvirt::shutdown(self, uuid).await
    }
    async fn destroy(&self, uuid: &str) -> Result<Outcome, HypervisorError> {
        Libvirt::destroy(self, uuid).await
    }
    async fn xml(&self, uuid: &str) -> Result<String, HypervisorError> {
        Libvirt::xml(self, uuid).await
    }
    async fn stats(&self, uuid: &str) -> Result<DomainStats, HypervisorError> {
        Libvirt::stats(self, uuid).await
    }
    async fn all_stats(&self) -> Result<Vec<DomainStats>, HypervisorError> {
        Libvirt::all_stats(self).await
    }
    async fn migrate(
        &self,
        uuid: &str,
        dest_uri: &str,
        opts: MigrateOptions,
    ) -> Result<(), HypervisorError> {
        Libvirt::migrate(self, uuid, dest_uri, opts).await
    }
    async fn events(&self) -> Result<mpsc::Receiver<DomainEvent>, HypervisorError> {
        Libvirt::events(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(version_string(9_000_000), "9.0.0");
        assert_eq!(version_string(10_002_003), "10.2.3");
    }

    #[test]
    fn pid_files_only_for_the_local_system_driver() {
        assert!(is_local_qemu_system("qemu:///system"));
        assert!(is_local_qemu_system("qemu+unix:///system"));
        assert!(!is_local_qemu_system(
            "qemu+unix:///system?socket=/run/ns1/libvirt-sock"
        ));
        assert!(!is_local_qemu_system("qemu:///session"));
        assert!(!is_local_qemu_system("qemu+ssh://host/system"));
        assert!(!is_local_qemu_system("test:///default"));
    }

    #[test]
    fn pid_file_must_name_a_process_with_the_uuid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uuid = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
        // Our own PID: a live process whose command line has no -uuid.
        std::fs::write(dir.path().join("vm.pid"), std::process::id().to_string()).expect("write");
        assert_eq!(qemu_pid(dir.path(), "vm", uuid), None);
        std::fs::write(dir.path().join("junk.pid"), "not a pid").expect("write");
        assert_eq!(qemu_pid(dir.path(), "junk", uuid), None);
        assert_eq!(qemu_pid(dir.path(), "missing", uuid), None);
        assert_eq!(qemu_pid(dir.path(), "../vm", uuid), None);
    }

    #[tokio::test]
    async fn probes_the_libvirt_test_driver() {
        let lv = Libvirt::new("test:///default", Duration::from_secs(10));
        let p = lv.probe().await.expect("test:///default answers");
        // The test driver starts with one running domain named "test".
        assert!(p.running >= 1);
        assert!(p.version.starts_with(|c: char| c.is_ascii_digit()));
        lv.close().await;
    }

    #[tokio::test]
    async fn reports_an_unreachable_libvirt() {
        let lv = Libvirt::new(
            "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
            Duration::from_secs(10),
        );
        let e = lv.probe().await.expect_err("no such socket");
        assert!(
            e.to_string().contains("/nonexistent/libvirt-sock")
                || e.to_string().contains("libvirt"),
            "{e}"
        );
        let e = lv
            .start("0a1b2c3d-4e5f-6789-abcd-ef0123456789")
            .await
            .expect_err("no such socket");
        assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
        assert!(
            e.to_string()
                .contains("start domain 0a1b2c3d-4e5f-6789-abcd-ef0123456789"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_silent_libvirtd_is_noticed_once_and_then_refused_at_once() {
        // A socket that accepts and never answers: every libvirt call on it hangs.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("libvirt-sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in listener.incoming().flatten() {
                held.push(s);
            }
        });
        let uri = format!("qemu+unix:///system?socket={}", path.display());
        let lv = Libvirt::new(&uri, Duration::from_millis(500));
        let uuid = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
        let e = lv.get(uuid).await.expect_err("no answer");
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        // The next call runs the probe (bounded by the call timeout here) and is refused,
        // as a timeout like the failure it stands for…
        let e = lv.get(uuid).await.expect_err("probe unanswered");
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(e.to_string().contains("calls are refused"), "{e}");
        // …and while that probe hangs, calls are refused without waiting: none of them
        // starts another probe (the only way a refused call reaches libvirt).
        let probes = lock(&lv.inner.outage).probes_started();
        for _ in 0..50 {
            let e = lv.list().await.expect_err("refused");
            assert!(e.to_string().contains("libvirt not answering for"), "{e}");
        }
        assert_eq!(
            lock(&lv.inner.outage).probes_started(),
            probes,
            "a refused call probed"
        );
        let e = lv.probe().await.expect_err("refused");
        assert!(matches!(e, HypervisorError::Libvirt { .. }), "{e}");
    }

    #[tokio::test]
    async fn refuses_bad_uuids_before_connecting() {
        // An unreachable URI: a connection attempt would fail differently.
        let lv = Libvirt::new(
            "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
            Duration::from_secs(10),
        );
        let e = lv.get("nope").await.expect_err("bad uuid");
        assert!(
            matches!(e, HypervisorError::InvalidUuid { op: Op::Get, .. }),
            "{e}"
        );
        let e = lv.destroy("").await.expect_err("bad uuid");
        assert!(
            matches!(
                e,
                HypervisorError::InvalidUuid {
                    op: Op::Destroy,
                    ..
                }
            ),
            "{e}"
        );
    }
}
