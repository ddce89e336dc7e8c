//! The call connection of [`Libvirt`](super::Libvirt) and the outage state in front of it.
//!
//! libvirt's remote client (9.0 here) crashes the process (SIGSEGV under
//! `virNetClientSendWithReply`) when a connection is closed while other threads are still
//! inside calls on it. Its client-side keepalive does exactly that when libvirtd hangs: the
//! event-loop thread closes the connection under the calls our timeouts left running. So:
//!
//! - Call connections run without libvirt's keepalive. A hung libvirtd is detected by our own
//!   call timeouts, a dead one by the socket (EOF, refused).
//! - Every call holds a [`Lease`] on the connection it uses. A connection that timed out or
//!   broke is *abandoned*: taken out of the shared slot, so new calls open a fresh one, and
//!   closed only when its last lease is dropped, i.e. when no call runs on it any more. A
//!   call that never returns keeps its connection open forever; the call permits bound that.
//! - [`Outage`] remembers that libvirt stopped answering: calls are then refused at once
//!   instead of each hanging a thread for its timeout, until a cheap probe call answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use virt::connect::Connect;

use super::error::ErrorKind;

/// Least time between two probes after a probe failed (a refusing socket answers at once).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A probe still running after this long no longer keeps another one from starting (it may
/// be stuck on a connection that will never answer).
pub const PROBE_STALE: Duration = Duration::from_secs(10);

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One opened call connection, owning one libvirt reference on it.
pub(super) struct CallConn {
    id: u64,
    conn: Option<Connect>,
}

/// A call's hold on a [`CallConn`]: the slot holds one, each running call another.
pub(super) type Lease = Arc<CallConn>;

impl CallConn {
    /// The libvirt connection.
    pub(super) fn conn(&self) -> &Connect {
        // `conn` is only taken by `into_connect` and Drop.
        self.conn
            .as_ref()
            .unwrap_or_else(|| unreachable!("a CallConn is used after its close"))
    }

    /// Which connection this is (to abandon it by identity).
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    /// The connection, closed by the caller instead of on drop.
    fn into_connect(mut self) -> Option<Connect> {
        self.conn.take()
    }
}

impl Drop for CallConn {
    /// Runs when the last lease goes: nothing runs on the connection any more. Closing it is
    /// an RPC (`REMOTE_PROC_CONNECT_CLOSE`) that hangs with libvirtd, so it runs on a thread
    /// of its own, never on the thread of whoever dropped the last lease.
    fn drop(&mut self) {
        let Some(mut c) = self.conn.take() else {
            return;
        };
        // If the thread cannot start, the reference is leaked: better than blocking here.
        let _ = std::thread::Builder::new()
            .name("libvirt-close".into())
            .spawn(move || {
                let _ = c.close();
            });
    }
}

/// The shared call connection of one URI: opened on demand, one opener at a time.
pub(super) struct Connections {
    uri: String,
    slot: Mutex<Option<Lease>>,
    /// Held while opening, so a slow or hung open is not repeated by every caller.
    opening: Mutex<()>,
    next_id: AtomicU64,
}

impl Connections {
    pub(super) fn new(uri: &str) -> Connections {
        Connections {
            uri: uri.to_string(),
            slot: Mutex::new(None),
            opening: Mutex::new(()),
            next_id: AtomicU64::new(1),
        }
    }

    /// The slot's connection if it is still open (a local check, no RPC); a closed one
    /// (libvirtd went away) is abandoned.
    fn current(&self) -> Option<Lease> {
        let mut slot = lock(&self.slot);
        match slot.as_ref() {
            Some(c) if c.conn().is_alive().unwrap_or(false) => Some(c.clone()),
            Some(_) => {
                slot.take();
                None
            }
            None => None,
        }
    }

    /// A lease on the shared connection, opened first if there is none. Blocks (the open is
    /// an RPC); callers run on call threads.
    pub(super) fn lease(&self) -> Result<Lease, virt::error::Error> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _opening = lock(&self.opening);
        if let Some(c) = self.current() {
            return Ok(c); // opened while we waited
        }
        // No virConnectSetKeepAlive: see the module documentation.
        let conn = Connect::open(Some(&self.uri))?;
        let lease = Arc::new(CallConn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            conn: Some(conn),
        });
        *lock(&self.slot) = Some(lease.clone());
        Ok(lease)
    }

    /// Stop handing out connection `id` (it timed out or broke); calls still running on it
    /// keep it open until they return. True if it was the shared one.
    pub(super) fn abandon(&self, id: u64) -> bool {
        let mut slot = lock(&self.slot);
        if slot.as_ref().is_some_and(|c| c.id == id) {
            slot.take();
            true
        } else {
            false
        }
    }

    /// Empty the slot (daemon shutdown). Returns the connection if no call holds it any
    /// more, for the caller to close; otherwise the last call closes it.
    pub(super) fn take(&self) -> Option<Connect> {
        let lease = lock(&self.slot).take()?;
        Arc::try_unwrap(lease).ok().and_then(CallConn::into_connect)
    }
}

/// What [`Outage::admit`] decided for a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// libvirt answers: go ahead.
    Go,
    /// libvirt was not answering and a probe is due: run probe `id`, then go if it answered.
    Probe(u64),
    /// libvirt is not answering (for this long; the last failure's kind and message):
    /// refuse without calling.
    Refuse(Duration, ErrorKind, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ProbeState {
    /// No probe running; the last one ended at this time (failed).
    Idle(Option<Instant>),
    /// Probe `id` started at this time.
    Running(u64, Instant),
}

#[derive(Debug, Clone)]
struct Down {
    since: Instant,
    last_kind: ErrorKind,
    last_error: String,
    probe: ProbeState,
}

/// Whether libvirt answers, as the calls found it.
///
/// Up until a call times out or finds its connection broken ([`failed`](Self::failed));
/// then down, refusing calls, until a probe answers ([`probed`](Self::probed)). Pure state:
/// the driver does the calling and the logging.
#[derive(Debug, Default)]
pub struct Outage {
    down: Option<Down>,
    probes: u64,
}

impl Outage {
    /// A call failed for want of libvirt (`kind`: a timeout or a broken connection). True
    /// if libvirt was answering until now, i.e. this starts an outage (log it).
    pub fn failed(&mut self, now: Instant, kind: ErrorKind, error: &str) -> bool {
        match &mut self.down {
            Some(d) => {
                d.last_kind = kind;
                d.last_error = error.to_string();
                false
            }
            None => {
                self.down = Some(Down {
                    since: now,
                    last_kind: kind,
                    last_error: error.to_string(),
                    probe: ProbeState::Idle(None),
                });
                true
            }
        }
    }

    /// How many probes were started: a test shows with it that refused calls never reached
    /// libvirt.
    #[cfg(test)]
    pub(crate) fn probes_started(&self) -> u64 {
        self.probes
    }

    /// How long libvirt has been down, if it is.
    pub fn down_for(&self, now: Instant) -> Option<Duration> {
        self.down
            .as_ref()
            .map(|d| now.saturating_duration_since(d.since))
    }

    /// May a call go ahead now? While down, at most one probe runs at a time (unless it has
    /// been running for [`PROBE_STALE`]), at most one per [`PROBE_INTERVAL`] after a failed
    /// one; every other call is refused.
    pub fn admit(&mut self, now: Instant) -> Admit {
        let Some(d) = &mut self.down else {
            return Admit::Go;
        };
        let due = match d.probe {
            ProbeState::Idle(None) => true,
            ProbeState::Idle(Some(at)) => now.saturating_duration_since(at) >= PROBE_INTERVAL,
            ProbeState::Running(_, at) => now.saturating_duration_since(at) >= PROBE_STALE,
        };
        if due {
            self.probes += 1;
            d.probe = ProbeState::Running(self.probes, now);
            Admit::Probe(self.probes)
        } else {
            Admit::Refuse(
                now.saturating_duration_since(d.since),
                d.last_kind,
                d.last_error.clone(),
            )
        }
    }

    /// Probe `id` returned (`error` if it failed), possibly long after its caller gave up.
    /// An answer ends the outage whichever probe gave it: returns how long it lasted (log
    /// it). A failure only lets the next probe start.
    pub fn probed(
        &mut self,
        now: Instant,
        id: u64,
        error: Option<(ErrorKind, &str)>,
    ) -> Option<Duration> {
        let d = self.down.as_mut()?;
        match error {
            None => {
                let lasted = now.saturating_duration_since(d.since);
                self.down = None;
                Some(lasted)
            }
            Some((kind, e)) => {
                d.last_kind = kind;
                d.last_error = e.to_string();
                if matches!(d.probe, ProbeState::Running(r, _) if r == id) {
                    d.probe = ProbeState::Idle(Some(now));
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_until_a_failure_then_one_probe_at_a_time() {
        let t0 = Instant::now();
        let mut o = Outage::default();
        assert_eq!(o.admit(t0), Admit::Go);
        assert!(o.failed(t0, ErrorKind::Timeout, "list: no answer within 10s"));
        assert!(
            !o.failed(t0, ErrorKind::Timeout, "get: no answer within 10s"),
            "logged once"
        );
        assert!(o.down_for(t0).is_some());
        // The first call after the failure probes; others are refused meanwhile.
        assert_eq!(o.admit(t0), Admit::Probe(1));
        let later = t0 + Duration::from_secs(3);
        assert_eq!(
            o.admit(later),
            Admit::Refuse(
                Duration::from_secs(3),
                ErrorKind::Timeout,
                "get: no answer within 10s".into()
            )
        );
        // A stuck probe stops blocking after PROBE_STALE.
        assert_eq!(o.admit(t0 + PROBE_STALE), Admit::Probe(2));
        // The stale probe failing does not clear the newer one.
        let refused = Some((ErrorKind::Connection, "refused"));
        assert_eq!(o.probed(t0 + PROBE_STALE, 1, refused), None);
        assert!(matches!(
            o.admit(t0 + PROBE_STALE),
            Admit::Refuse(_, ErrorKind::Connection, e) if e == "refused"
        ));
        // The newer one failing lets the next start after PROBE_INTERVAL.
        let t1 = t0 + PROBE_STALE + Duration::from_millis(10);
        assert_eq!(o.probed(t1, 2, refused), None);
        assert!(matches!(o.admit(t1), Admit::Refuse(..)));
        assert_eq!(o.admit(t1 + PROBE_INTERVAL), Admit::Probe(3));
        // Any probe answering ends the outage, with its length.
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(
            o.probed(t2, 1, None),
            Some(t2.duration_since(t0)),
            "a late answer of an old probe counts"
        );
        assert_eq!(o.down_for(t2), None);
        assert_eq!(o.admit(t2), Admit::Go);
        // Late results after recovery change nothing.
        assert_eq!(o.probed(t2, 3, None), None);
        assert_eq!(o.probed(t2, 3, Some((ErrorKind::Timeout, "late"))), None);
        assert_eq!(o.admit(t2), Admit::Go);
    }

    #[test]
    fn abandoned_connections_close_only_after_their_last_call() {
        // test:///default opens locally; closing is observable through the reference count
        // libvirt keeps: a connection still leased must stay usable after abandonment.
        let conns = Connections::new("test:///default");
        let a = conns.lease().expect("open");
        let again = conns.lease().expect("shared");
        assert_eq!(a.id(), again.id(), "one shared connection");
        drop(again);
        assert!(conns.abandon(a.id()));
        assert!(!conns.abandon(a.id()), "abandoned once");
        // The running call still uses it…
        assert!(a.conn().get_lib_version().is_ok());
        // …while new calls get a fresh one.
        let b = conns.lease().expect("reopen");
        assert_ne!(a.id(), b.id());
        drop(a); // the last lease: closed in the background
        drop(b);
        let mut c = conns.take().expect("no lease left: the caller closes it");
        assert!(c.close().is_ok());
        assert!(conns.take().is_none());
    }
}
