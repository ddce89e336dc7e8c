//! Domain lifecycle events through the raw libvirt event API (virt 0.4.3 does not wrap it).
//!
//! libvirt delivers events from its event loop: `virEventRegisterDefaultImpl` must run
//! before any connection is opened (a connection opened earlier never gets its socket into
//! the loop, so it sees no events and no keepalive), and `virEventRunDefaultImpl` must be
//! called in a loop on a thread of its own. [`ensure_event_loop`] does both, once per process;
//! [`Libvirt::new`](super::Libvirt::new) calls it.
//!
//! Each subscription runs on its own thread with its own connection: callbacks run on the
//! event-loop thread and only `try_send` into a bounded tokio channel (never block the loop,
//! which also drives keepalive). When the connection closes (libvirtd restarted, keepalive
//! timeout) the thread reconnects with backoff and sends [`DomainEvent::Resync`], since
//! events in between are lost.
//!
//! The event connection keeps libvirt's client keepalive (it is how a hung libvirtd is
//! noticed here, where no call times out), but only while no thread is inside a call on it:
//! it is switched on after the registrations and off again before deregistering. libvirt
//! closes a connection whose keepalive expired from the event-loop thread, and closing one
//! under a running call crashes libvirt's client (see the `conn` module). Call connections
//! never share this connection.

use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use virt::connect::Connect;
use virt::sys;

use super::error::{DomainRef, ErrorKind, HypervisorError};
use super::stats::identity;
use super::types::{DomainEvent, Lifecycle, Op};

/// Queue length of an event subscription; a burst beyond it turns into one `Resync`.
pub const EVENT_QUEUE: usize = 4096;

/// libvirt keepalive on event connections: a probe every 5 s, closed after 3 unanswered.
const KEEPALIVE_INTERVAL: libc::c_int = 5;
const KEEPALIVE_COUNT: libc::c_uint = 3;

static EVENT_LOOP: OnceLock<Result<(), String>> = OnceLock::new();

/// Register libvirt's default event loop and run it on the `libvirt-events` thread (once
/// per process). Must happen before the first connection is opened.
pub fn ensure_event_loop() -> Result<(), String> {
    EVENT_LOOP
        .get_or_init(|| {
            // libvirt prints every error to stderr by default; we report them ourselves.
            virt::error::clear_error_callback();
            // SAFETY: plain libvirt initialisation, once (OnceLock).
            if unsafe { sys::virEventRegisterDefaultImpl() } < 0 {
                return Err(format!(
                    "virEventRegisterDefaultImpl: {}",
                    virt::error::Error::last_error().message()
                ));
            }
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| loop {
                    // SAFETY: the default implementation was registered above.
                    if unsafe { sys::virEventRunDefaultImpl() } < 0 {
                        let e = virt::error::Error::last_error();
                        warn!(error = %e.message(), "libvirt event loop iteration failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                })
                .map(|_| ())
                .map_err(|e| format!("spawning the libvirt event thread: {e}"))
        })
        .clone()
}

/// What the lifecycle callback owns (freed by libvirt through [`free_ctx`]).
struct EventCtx {
    tx: mpsc::Sender<DomainEvent>,
    /// Events dropped because the queue was full, not yet reported by a `Resync`.
    lost: AtomicU64,
}

impl EventCtx {
    fn deliver(&self, ev: DomainEvent) {
        let lost = self.lost.load(Ordering::Relaxed);
        if lost > 0 {
            let resync = DomainEvent::Resync {
                reason: format!("{lost} domain events dropped: the event queue was full"),
            };
            if self.tx.try_send(resync).is_err() {
                self.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.lost.store(0, Ordering::Relaxed);
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(ev) {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `virConnectDomainEventCallback` for `VIR_DOMAIN_EVENT_ID_LIFECYCLE`.
unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: libc::c_int,
    detail: libc::c_int,
    opaque: *mut libc::c_void,
) -> libc::c_int {
    if opaque.is_null() {
        return 0;
    }
    // SAFETY: `opaque` is the EventCtx registered with this callback; libvirt frees it (via
    // free_ctx) only after the callback is deregistered.
    let ctx = unsafe { &*(opaque as *const EventCtx) };
    if let Some((uuid, name)) = identity(dom) {
        ctx.deliver(DomainEvent::Lifecycle {
            uuid: uuid.to_ascii_lowercase(),
            name,
            event: Lifecycle::from_raw(event, detail),
        });
    }
    0
}

unsafe extern "C" fn free_ctx(opaque: *mut libc::c_void) {
    if !opaque.is_null() {
        // SAFETY: created by Box::into_raw in Subscription::open; freed once by libvirt.
        drop(unsafe { Box::from_raw(opaque as *mut EventCtx) });
    }
}

/// `virConnectCloseFunc`: tells the subscription thread its connection is gone.
unsafe extern "C" fn on_close(
    _conn: sys::virConnectPtr,
    reason: libc::c_int,
    opaque: *mut libc::c_void,
) {
    if !opaque.is_null() {
        // SAFETY: the Sender registered with this callback, alive until free_close.
        let tx = unsafe { &*(opaque as *const std::sync::mpsc::Sender<i32>) };
        let _ = tx.send(reason);
    }
}

unsafe extern "C" fn free_close(opaque: *mut libc::c_void) {
    if !opaque.is_null() {
        // SAFETY: created by Box::into_raw in Subscription::open; freed once by libvirt.
        drop(unsafe { Box::from_raw(opaque as *mut std::sync::mpsc::Sender<i32>) });
    }
}

fn close_reason(r: i32) -> &'static str {
    match u32::try_from(r).unwrap_or(u32::MAX) {
        sys::VIR_CONNECT_CLOSE_REASON_ERROR => "connection error",
        sys::VIR_CONNECT_CLOSE_REASON_EOF => "libvirtd closed the connection",
        sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE => "keepalive timeout",
        sys::VIR_CONNECT_CLOSE_REASON_CLIENT => "closed by client",
        _ => "closed",
    }
}

/// One open connection with the lifecycle callback (and a close callback) registered.
struct Subscription {
    conn: Connect,
    callback_id: libc::c_int,
    closed: Option<std::sync::mpsc::Receiver<i32>>,
}

impl Subscription {
    fn open(uri: &str, tx: &mpsc::Sender<DomainEvent>) -> Result<Subscription, virt::error::Error> {
        let mut conn = Connect::open(Some(uri))?;

        let (close_tx, close_rx) = std::sync::mpsc::channel::<i32>();
        let close_opaque = Box::into_raw(Box::new(close_tx)) as *mut libc::c_void;
        // SAFETY: valid connection; on success libvirt owns `close_opaque` (free_close).
        let closed = if unsafe {
            sys::virConnectRegisterCloseCallback(
                conn.as_ptr(),
                Some(on_close),
                close_opaque,
                Some(free_close),
            )
        } < 0
        {
            // SAFETY: not registered, so still ours.
            unsafe { free_close(close_opaque) };
            None
        } else {
            Some(close_rx)
        };

        let ctx = Box::into_raw(Box::new(EventCtx {
            tx: tx.clone(),
            lost: AtomicU64::new(0),
        })) as *mut libc::c_void;
        type LifecycleCb = unsafe extern "C" fn(
            sys::virConnectPtr,
            sys::virDomainPtr,
            libc::c_int,
            libc::c_int,
            *mut libc::c_void,
        ) -> libc::c_int;
        type GenericCb =
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut libc::c_void);
        // SAFETY: libvirt's documented VIR_DOMAIN_EVENT_CALLBACK cast: it calls the callback
        // with the signature of the event ID it was registered for.
        let cb = unsafe { std::mem::transmute::<LifecycleCb, GenericCb>(on_lifecycle) };
        // SAFETY: valid connection; on success libvirt owns `ctx` and frees it via free_ctx.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as libc::c_int,
                Some(cb),
                ctx,
                Some(free_ctx),
            )
        };
        if id < 0 {
            let e = virt::error::Error::last_error();
            // Whether libvirt already called free_ctx on failure differs between drivers;
            // leaking one small context is safer than a double free.
            if closed.is_some() {
                // SAFETY: registered above on this connection.
                unsafe { sys::virConnectUnregisterCloseCallback(conn.as_ptr(), Some(on_close)) };
            }
            let _ = conn.close();
            return Err(e);
        }
        // Only now, with no call of ours left on this connection (see the module
        // documentation). Remote connections only; other drivers answer "unsupported".
        // SAFETY: valid connection.
        unsafe { sys::virConnectSetKeepAlive(conn.as_ptr(), KEEPALIVE_INTERVAL, KEEPALIVE_COUNT) };
        Ok(Subscription {
            conn,
            callback_id: id,
            closed,
        })
    }

    /// Block until the connection closes (`Some(reason)`) or the receiver is dropped
    /// (`None`).
    fn wait(&self, tx: &mpsc::Sender<DomainEvent>) -> Option<String> {
        let tick = Duration::from_millis(250);
        let mut ticks: u32 = 0;
        loop {
            if tx.is_closed() {
                return None;
            }
            match &self.closed {
                Some(rx) => match rx.recv_timeout(tick) {
                    Ok(r) => return Some(close_reason(r).to_string()),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        std::thread::sleep(tick)
                    }
                },
                None => std::thread::sleep(tick),
            }
            ticks = ticks.wrapping_add(1);
            // Belt and braces for drivers without close callbacks: a local check, no RPC.
            if ticks % 8 == 0 && !self.conn.is_alive().unwrap_or(false) {
                return Some("connection no longer alive".into());
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // SAFETY: the callback and close callback were registered on this connection; the
        // keepalive goes first so it cannot close the connection under the calls below
        // (on a connection that is already closed this fails, which is fine).
        unsafe {
            sys::virConnectSetKeepAlive(self.conn.as_ptr(), -1, 0);
            sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.callback_id);
            if self.closed.is_some() {
                sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(on_close));
            }
        }
        let _ = self.conn.close();
    }
}

/// Start a subscription thread for `uri`; resolves once the first connection is registered
/// (or failed: then there is no thread and the error is returned).
pub(crate) async fn subscribe(
    uri: &str,
    timeout: Duration,
) -> Result<mpsc::Receiver<DomainEvent>, HypervisorError> {
    let fail = |kind: ErrorKind, message: String| HypervisorError::Domain {
        uri: uri.to_string(),
        op: Op::Events,
        domain: DomainRef::none(),
        kind,
        message,
    };
    ensure_event_loop().map_err(|m| fail(ErrorKind::Other, m))?;
    if CString::new(uri).is_err() {
        return Err(fail(ErrorKind::InvalidInput, "URI contains NUL".into()));
    }
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let (ready_tx, ready_rx) = oneshot::channel();
    let thread_uri = uri.to_string();
    std::thread::Builder::new()
        .name("libvirt-subscr".into())
        .spawn(move || run(thread_uri, tx, ready_tx))
        .map_err(|e| fail(ErrorKind::Other, format!("spawning the event thread: {e}")))?;
    match tokio::time::timeout(timeout, ready_rx).await {
        Ok(Ok(Ok(()))) => Ok(rx),
        Ok(Ok(Err(e))) => Err(fail(ErrorKind::of(&e), e.message().to_string())),
        Ok(Err(_)) => Err(fail(ErrorKind::Other, "event thread ended".into())),
        // The thread gives up on its own once it sees the receiver dropped.
        Err(_) => Err(HypervisorError::DomainTimeout {
            uri: uri.to_string(),
            op: Op::Events,
            domain: DomainRef::none(),
            timeout,
        }),
    }
}

/// The subscription thread: connect, register, wait; reconnect with backoff until the
/// receiver is dropped.
fn run(
    uri: String,
    tx: mpsc::Sender<DomainEvent>,
    ready: oneshot::Sender<Result<(), virt::error::Error>>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(250);
    // When the connection was lost, for the log line once it is back.
    let mut lost_at: Option<std::time::Instant> = None;
    loop {
        if tx.is_closed() {
            return;
        }
        match Subscription::open(&uri, &tx) {
            Ok(sub) => {
                match ready.take() {
                    Some(r) => {
                        if r.send(Ok(())).is_err() {
                            return; // the caller timed out and left
                        }
                    }
                    None => {
                        let down_ms = lost_at.take().map(|t| t.elapsed().as_millis() as u64);
                        info!(uri = %uri, down_ms, "libvirt event connection re-established");
                        let _ = tx.blocking_send(DomainEvent::Resync {
                            reason: format!(
                                "event connection to {uri} re-established; events may have been lost"
                            ),
                        });
                    }
                }
                backoff = Duration::from_millis(250);
                let closed = sub.wait(&tx);
                drop(sub);
                match closed {
                    None => return,
                    Some(reason) => {
                        lost_at = Some(std::time::Instant::now());
                        warn!(uri = %uri, reason = %reason, "libvirt event connection lost; reconnecting");
                    }
                }
            }
            Err(e) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(e));
                    return;
                }
                debug!(uri = %uri, error = %e.message(), "libvirt event connection failed; retrying");
            }
        }
        // Back off, but notice a dropped receiver quickly.
        let until = std::time::Instant::now() + backoff;
        while std::time::Instant::now() < until {
            if tx.is_closed() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
