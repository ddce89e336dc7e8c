//! The harness's side of a node's power: what the supervisor (see the `power` module)
//! reports, and what the harness does about it — boot the node on power on, reap it on
//! power off.
//!
//! Per BMC, one watcher thread accepts the supervisor's connection (one per power cycle)
//! and boots the node: `eth0` configured and up, libvirtd restarted (same directories),
//! the daemon spawned with the same state dir. A reader thread per connection handles the
//! power off: `off` stops any boot in progress (a generation counter, checked under the
//! launch lock before each spawn, so nothing is started once the supervisor kills) and is
//! acknowledged; `down` records the node's death (also for the run recorder) and reaps the
//! daemon and libvirtd. A supervisor that vanishes without `down` (SIGKILLed by ipmi_sim)
//! makes the harness kill the node itself.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::lock;
use super::power::{
    instant_of_monotonic, kill_all_in, network_off, PowerMsg, KILL_WAIT, NODE_LINK,
};
use super::runs::Runs;
use crate::daemon::{DaemonBuilder, DaemonProcess};
use crate::error::{HarnessError, Result};
use crate::libvirt_pair::{process_netns_inode, IsolatedLibvirt};

/// What happened to a node's power, as the harness learnt it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEventKind {
    /// Power came on (the supervisor reported in).
    On,
    /// A power off began (the supervisor got SIGTERM).
    OffRequested,
    /// The node is dead: every process of its namespace killed (`survivors` did not die).
    Down {
        /// Processes that survived the kill loop (0 normally).
        survivors: usize,
    },
}

/// One entry of a BMC's power log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerEvent {
    /// When (for `Down`: when the last process was seen dead).
    pub at: Instant,
    /// What.
    pub kind: PowerEventKind,
}

/// Whether the harness may start processes of the node, and for which power cycle.
#[derive(Debug, Default)]
pub(super) struct Launch {
    /// Power is on.
    pub on: bool,
    /// Bumped by every power on and power off: a boot checks it before each spawn.
    pub generation: u64,
    /// The generation whose boot finished (the daemon spawned).
    pub launched: u64,
    /// Why the boot of `generation` failed.
    pub failed: Option<String>,
    /// The cluster is being torn down: start nothing.
    pub closing: bool,
}

/// A node's power, shared by its `Node`, its `Bmc` and the BMC's threads.
#[derive(Debug)]
pub(super) struct PowerState {
    pub node: String,
    pub launch: Mutex<Launch>,
    pub log: Mutex<Vec<PowerEvent>>,
    /// PID of the running supervisor.
    pub supervisor: Mutex<Option<u32>>,
    pub runs: Option<Runs>,
}

impl PowerState {
    pub fn new(node: &str, runs: Option<Runs>) -> PowerState {
        PowerState {
            node: node.to_owned(),
            launch: Mutex::new(Launch::default()),
            log: Mutex::new(Vec::new()),
            supervisor: Mutex::new(None),
            runs,
        }
    }

    fn record(&self, at: Instant, kind: PowerEventKind) {
        lock(&self.log).push(PowerEvent { at, kind });
    }

    pub fn closing(&self) -> bool {
        lock(&self.launch).closing
    }

    /// Teardown: start nothing any more, abort any boot.
    pub fn close(&self) {
        let mut l = lock(&self.launch);
        l.closing = true;
        l.generation += 1;
    }

    pub fn is_on(&self) -> bool {
        lock(&self.launch).on
    }

    /// Run `f` (a spawn) under the launch lock if power cycle `generation` is still on.
    pub fn guarded<T>(&self, generation: u64, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let l = lock(&self.launch);
        if l.closing || !l.on || l.generation != generation {
            return Err(HarnessError::State(format!(
                "node {}: powered off while booting",
                self.node
            )));
        }
        let r = f();
        drop(l);
        r
    }

    /// Run `f` (a spawn by the test) under the launch lock if power is on.
    pub fn if_on<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let g = lock(&self.launch).generation;
        self.guarded(g, f)
    }

    fn powered_on(&self, pid: u32) -> u64 {
        *lock(&self.supervisor) = Some(pid);
        let mut l = lock(&self.launch);
        l.on = true;
        l.generation += 1;
        l.failed = None;
        self.record(Instant::now(), PowerEventKind::On);
        l.generation
    }

    fn powering_off(&self, at: Instant) {
        let mut l = lock(&self.launch);
        l.on = false;
        l.generation += 1;
        drop(l);
        self.record(at, PowerEventKind::OffRequested);
    }

    fn booted(&self, generation: u64, r: Result<()>) {
        let mut l = lock(&self.launch);
        if l.generation != generation {
            return;
        }
        match r {
            Ok(()) => l.launched = generation,
            Err(e) => {
                eprintln!("debvisor-tests: node {}: boot failed: {e}", self.node);
                l.failed = Some(e.to_string());
            }
        }
    }

    /// Wait until power is on and its boot finished (the daemon spawned), or fail with the
    /// boot's error or after `timeout`.
    pub fn wait_booted(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let l = lock(&self.launch);
                if l.on && l.launched == l.generation {
                    return Ok(());
                }
                if let (true, Some(e)) = (l.on, &l.failed) {
                    return Err(HarnessError::State(format!(
                        "node {}: boot failed: {e}",
                        self.node
                    )));
                }
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("node {} to be powered on and booted", self.node),
                    timeout,
                    tail: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// What the BMC's threads need of the node to boot and reap it.
#[derive(Debug, Clone)]
pub(super) struct NodeParts {
    pub ns: String,
    pub ns_inode: u64,
    pub addr: Ipv4Addr,
    pub builder: DaemonBuilder,
    pub daemon: Arc<Mutex<Option<DaemonProcess>>>,
    pub stopped: Arc<AtomicBool>,
    pub libvirt: Option<Arc<IsolatedLibvirt>>,
}

impl NodeParts {
    /// Reap the dead node's daemon and libvirtd.
    fn reap(&self) {
        if let Some(d) = lock(&self.daemon).as_mut() {
            if let Err(e) = d.kill() {
                eprintln!("debvisor-tests: reaping debvisord {}: {e}", d.node());
            }
        }
        self.stopped.store(false, Ordering::SeqCst);
        if let Some(lv) = &self.libvirt {
            lv.reap();
        }
    }
}

/// The watcher thread: accept each power cycle's supervisor, boot the node (not on the
/// cluster's first power on: the builder starts the node then), hand the connection to a
/// reader thread.
pub(super) fn watch(listener: UnixListener, state: Arc<PowerState>, parts: NodeParts) {
    let mut first = true;
    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    while !state.closing() {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    eprintln!("debvisor-tests: node {}: power socket: {e}", state.node);
                }
                std::thread::sleep(Duration::from_millis(25));
                continue;
            }
        };
        let Some((pid, conn)) = hello(conn) else {
            continue;
        };
        let generation = state.powered_on(pid);
        let (s, p) = (state.clone(), parts.clone());
        match std::thread::Builder::new()
            .name(format!("power {}", state.node))
            .spawn(move || read_power(conn, s, p))
        {
            Ok(h) => readers.push(h),
            Err(e) => eprintln!("debvisor-tests: node {}: reader thread: {e}", state.node),
        }
        let r = if first {
            Ok(())
        } else {
            boot(&parts, &state, generation)
        };
        first = false;
        state.booted(generation, r);
    }
    for h in readers {
        let _ = h.join();
    }
}

/// Read the supervisor's `on <pid>`.
fn hello(conn: UnixStream) -> Option<(u32, UnixStream)> {
    conn.set_nonblocking(false).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut line = String::new();
    BufReader::new(conn.try_clone().ok()?)
        .read_line(&mut line)
        .ok()?;
    match PowerMsg::parse(&line) {
        Some(PowerMsg::On(pid)) => Some((pid, conn)),
        _ => {
            eprintln!("debvisor-tests: unexpected hello on a power socket: {line:?}");
            None
        }
    }
}

/// Boot the node for power cycle `generation`: network, libvirtd, daemon.
fn boot(parts: &NodeParts, state: &PowerState, generation: u64) -> Result<()> {
    state.guarded(generation, || network_on(parts))?;
    if let Some(lv) = &parts.libvirt {
        state.guarded(generation, || lv.respawn())?;
        lv.wait_ready()?;
    }
    state.guarded(generation, || {
        spawn_daemon(&parts.daemon, &parts.builder, &parts.stopped)?;
        let pid = lock(&parts.daemon).as_mut().map(|d| d.pid());
        wait_inside(pid, parts.ns_inode);
        Ok(())
    })
}

/// The node's address on `eth0`, and the link up (what the host's own network setup does
/// at boot, before the daemon).
fn network_on(parts: &NodeParts) -> Result<()> {
    let cidr = format!("{}/24", parts.addr);
    crate::netns::ip(&["-n", &parts.ns, "addr", "replace", &cidr, "dev", NODE_LINK])?;
    crate::netns::ip(&["-n", &parts.ns, "link", "set", NODE_LINK, "up"])
}

/// Wait (briefly) until process `pid` has entered the namespace `inode` (`ip netns exec`
/// does so right after it starts), so a power off from now on finds it.
fn wait_inside(pid: Option<u32>, inode: u64) {
    let Some(pid) = pid else { return };
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match process_netns_inode(pid) {
            Some(i) if i == inode => return,
            None => return,
            Some(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// The reader thread of one power cycle's connection.
fn read_power(conn: UnixStream, state: Arc<PowerState>, parts: NodeParts) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    let mut down = false;
    loop {
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {
                match PowerMsg::parse(&line) {
                    Some(PowerMsg::Off(t)) => {
                        state.powering_off(instant_of_monotonic(t));
                        let _ = writer.write_all(PowerMsg::Ack.line().as_bytes());
                    }
                    Some(PowerMsg::Down(t, survivors)) => {
                        node_down(&state, &parts, instant_of_monotonic(t), survivors);
                        down = true;
                    }
                    _ => eprintln!("debvisor-tests: node {}: power: {line:?}", state.node),
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if state.closing() {
                    return;
                }
            }
            Err(_) => break,
        }
    }
    if !down && !state.closing() {
        // The supervisor died without reporting (SIGKILLed after ipmi_sim's kill_wait):
        // finish its work.
        state.powering_off(Instant::now());
        let own = [std::process::id()];
        let survivors = kill_all_in(parts.ns_inode, &own, KILL_WAIT).len();
        let at = Instant::now();
        if let Err(e) = network_off(&parts.ns) {
            eprintln!("debvisor-tests: node {}: network off: {e}", state.node);
        }
        node_down(&state, &parts, at, survivors);
    }
}

/// The node is dead since `at`: record it, tell the run recorder, reap.
fn node_down(state: &PowerState, parts: &NodeParts, at: Instant, survivors: usize) {
    state.record(at, PowerEventKind::Down { survivors });
    *lock(&state.supervisor) = None;
    if let Some(r) = &state.runs {
        r.node_down(&state.node, at);
    }
    parts.reap();
    if survivors > 0 {
        eprintln!(
            "debvisor-tests: node {}: {survivors} processes survived its power off",
            state.node
        );
    }
}

/// Spawn a daemon from `builder` into `slot` unless one runs there; the instant.
pub(super) fn spawn_daemon(
    slot: &Mutex<Option<DaemonProcess>>,
    builder: &DaemonBuilder,
    stopped: &AtomicBool,
) -> Result<Instant> {
    let mut d = lock(slot);
    if let Some(p) = d.as_mut() {
        if p.is_running() {
            return Err(HarnessError::State(format!(
                "node {}: the daemon runs already (pid {})",
                p.node(),
                p.pid()
            )));
        }
    }
    let p = builder.clone().spawn()?;
    let at = Instant::now();
    stopped.store(false, Ordering::SeqCst);
    *d = Some(p);
    Ok(at)
}
