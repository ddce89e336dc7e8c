//! A loopback TCP forwarder that can be cut, to simulate a network break between a client
//! and a server (typically etcd).

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use crate::error::{HarnessError, IoContext, Result};

/// State shared between the [`TcpProxy`] handle and its thread.
#[derive(Debug)]
struct Shared {
    /// While set, accepted connections are closed at once.
    cut: AtomicBool,
    /// Bumped by `cut()`; every connection task exits when it changes.
    generation: watch::Sender<u64>,
    /// Number of live forwarded connections.
    active: Mutex<usize>,
    /// Signalled whenever `active` decreases.
    active_cv: Condvar,
    /// Connections accepted so far (including ones closed because of a cut).
    accepted: AtomicU64,
}

impl Shared {
    fn lock_active(&self) -> std::sync::MutexGuard<'_, usize> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Decrements the live-connection count when a connection task ends.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut n = self.0.lock_active();
        *n = n.saturating_sub(1);
        self.0.active_cv.notify_all();
    }
}

/// A TCP forwarder on `127.0.0.1:<free port>` to a target address, running on its own thread
/// with a current-thread tokio runtime (usable from sync and async tests alike).
///
/// Dropping it stops the thread and closes every connection.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Listen on a free loopback port and forward every connection to `target`.
    pub fn start(target: SocketAddr) -> Result<Self> {
        let listener = StdListener::bind(("127.0.0.1", 0))
            .ctx(|| "binding the proxy listener on 127.0.0.1:0".to_owned())?;
        listener
            .set_nonblocking(true)
            .ctx(|| "making the proxy listener non-blocking".to_owned())?;
        let addr = listener
            .local_addr()
            .ctx(|| "reading the proxy address".to_owned())?;
        let (generation, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            cut: AtomicBool::new(false),
            generation,
            active: Mutex::new(0),
            active_cv: Condvar::new(),
            accepted: AtomicU64::new(0),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ctx(|| "building the proxy runtime".to_owned())?;
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tcp-proxy-{}", addr.port()))
            .spawn(move || {
                rt.block_on(accept_loop(listener, target, thread_shared, shutdown_rx));
                // Dropping the runtime here cancels every connection task, closing sockets.
                drop(rt);
            })
            .ctx(|| "spawning the proxy thread".to_owned())?;
        Ok(TcpProxy {
            addr,
            target,
            shared,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    /// The proxy's listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// `http://127.0.0.1:PORT` of the proxy (use `https://` yourself for a TLS target).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Close every open connection and make new connections get closed right after accept,
    /// until [`TcpProxy::restore`]. Returns once all forwarded connections are closed (or
    /// after 5 s, with an error).
    pub fn cut(&self) -> Result<()> {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.generation.send_modify(|g| *g += 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut n = self.shared.lock_active();
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HarnessError::State(format!(
                    "proxy cut: {} connection(s) still open after 5 s",
                    *n
                )));
            }
            n = self
                .shared
                .active_cv
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Resume forwarding new connections.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Whether the proxy is currently cut.
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }

    /// Number of connections currently being forwarded.
    pub fn active_connections(&self) -> usize {
        *self.shared.lock_active()
    }

    /// Number of connections accepted so far (including those closed because of a cut).
    pub fn accepted_connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("debvisor-tests: proxy thread for {} panicked", self.addr);
            }
        }
    }
}

/// Accept connections until shutdown; each one gets its own forwarding task.
async fn accept_loop(
    listener: StdListener,
    target: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("debvisor-tests: proxy listener: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let inbound = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        eprintln!("debvisor-tests: proxy accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                // Subscribe before checking the flag: a cut after this point is seen through
                // the watch, a cut before it through the flag.
                let gen_rx = shared.generation.subscribe();
                if shared.cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                *shared.lock_active() += 1;
                let guard = ActiveGuard(shared.clone());
                tokio::spawn(forward(inbound, target, gen_rx, guard));
            }
        }
    }
}

/// Forward one connection until either side closes or the proxy is cut.
async fn forward(
    mut inbound: TcpStream,
    target: SocketAddr,
    mut gen_rx: watch::Receiver<u64>,
    guard: ActiveGuard,
) {
    let _ = inbound.set_nodelay(true);
    let connect = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target));
    let outbound = tokio::select! {
        r = connect => r,
        _ = gen_rx.changed() => { drop(inbound); drop(guard); return; }
    };
    let mut outbound = match outbound {
        Ok(Ok(s)) => s,
        _ => {
            drop(inbound);
            drop(guard);
            return;
        }
    };
    let _ = outbound.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = gen_rx.changed() => {}
    }
    drop(inbound);
    drop(outbound);
    drop(guard);
}
