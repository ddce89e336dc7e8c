//! One node of the cluster: its namespace, its daemon, and the faults a test applies to it.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::bmc::Bmc;
use super::boot::spawn_daemon;
use super::flap::Flap;
use super::guest::DhcpGuest;
use super::power::{processes_in, NodeProcess};
use super::{lock, switch, wait_until};
use crate::daemon::{is_message, str_field, DaemonBuilder, DaemonProcess};
use crate::error::{tail_of, HarnessError, IoContext, Result};
use crate::etcd::{send_signal, MEMBER_CLIENT_PORT};
use crate::libvirt_pair::IsolatedLibvirt;
use crate::netns::NetNs;

/// The nft table [`Node::cut_etcd`] adds in the node's namespace.
pub const CUT_TABLE: &str = "dvtest_cut";
/// How long [`Node::restart`] and [`Node::sigterm_and_wait`] give the daemon to exit after
/// SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A node: namespace `dvcl-cN-…` with `eth0` on the switch (switch port named after the
/// node), its daemon (re-spawnable with the same state dir), optionally its own libvirtd.
///
/// Every method takes `&self` (the daemon sits behind a mutex), so faults can be applied from
/// other threads while a test waits on something else.
#[derive(Debug)]
pub struct Node {
    pub(super) index: usize,
    pub(super) name: String,
    pub(super) addr: Ipv4Addr,
    pub(super) builder: DaemonBuilder,
    /// The current daemon process (kept after it exits, for its logs and config; shared
    /// with the BMC's threads, which boot and reap the node).
    pub(super) daemon: Arc<Mutex<Option<DaemonProcess>>>,
    /// The daemon is SIGSTOPped.
    pub(super) stopped: Arc<AtomicBool>,
    pub(super) etcd_cut: AtomicBool,
    pub(super) guests: AtomicUsize,
    pub(super) switch_ns: String,
    pub(super) etcd_addrs: Vec<Ipv4Addr>,
    pub(super) dir: PathBuf,
    /// Inode of the node's network namespace (what `/proc/<pid>/ns/net` shows).
    pub(super) ns_inode: u64,
    /// The node's BMC (`.bmcs(true)`); dropped before the libvirtd it restarts.
    pub(super) bmc: Option<Bmc>,
    // Dropped after the daemon (field order), before the namespace.
    pub(super) libvirt: Option<Arc<IsolatedLibvirt>>,
    pub(super) ns: NetNs,
}

impl Node {
    /// Index in the cluster (0-based: node `c1` is 0).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Node name (`c1`, `c2`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Address on the cluster network (`192.0.2.<index + 1>`).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The node's namespace.
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// The switch port of the node (`ip -n <switch> link show <port>`).
    pub fn switch_port(&self) -> &str {
        &self.name
    }

    /// The daemon's state dir (kept across [`Node::restart`]).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The node's isolated libvirtd, when the cluster was built with one per node.
    pub fn libvirt(&self) -> Option<&IsolatedLibvirt> {
        self.libvirt.as_deref()
    }

    /// The node's BMC.
    ///
    /// # Panics
    /// If the cluster was built without `.bmcs(true)`.
    #[track_caller]
    pub fn bmc(&self) -> &Bmc {
        match &self.bmc {
            Some(b) => b,
            None => panic!(
                "node {}: the cluster was built without .bmcs(true)",
                self.name
            ),
        }
    }

    /// The node's BMC, if the cluster has them.
    pub fn try_bmc(&self) -> Option<&Bmc> {
        self.bmc.as_ref()
    }

    /// Every live process in the node's network namespace (daemon, libvirtd, qemu, dnsmasq,
    /// commands run there), by PID: what a power off must leave empty.
    pub fn processes(&self) -> Vec<NodeProcess> {
        processes_in(self.ns_inode, &[])
    }

    /// Run `f` on the current daemon process (an error if none was ever spawned).
    pub fn with_daemon<T>(&self, f: impl FnOnce(&mut DaemonProcess) -> T) -> Result<T> {
        let mut d = lock(&self.daemon);
        match d.as_mut() {
            Some(d) => Ok(f(d)),
            None => Err(HarnessError::State(format!(
                "node {}: its daemon was never started",
                self.name
            ))),
        }
    }

    /// PID of the daemon if it runs.
    pub fn pid(&self) -> Option<u32> {
        let mut d = lock(&self.daemon);
        let p = d.as_mut()?;
        p.is_running().then(|| p.pid())
    }

    /// Whether the daemon process runs (also when SIGSTOPped).
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// The daemon's log events so far (of the current process).
    pub fn json_lines(&self) -> Vec<Value> {
        self.with_daemon(|d| d.json_lines()).unwrap_or_default()
    }

    /// The last `n` output lines of the current daemon process.
    pub fn tail(&self, n: usize) -> String {
        self.with_daemon(|d| d.tail(n)).unwrap_or_default()
    }

    /// Spawn the daemon (with the node's state dir). Fails if it runs already, or if the
    /// node's BMC has it powered off. Returns the instant it was spawned.
    pub fn start(&self) -> Result<Instant> {
        let spawn = || spawn_daemon(&self.daemon, &self.builder, &self.stopped);
        match &self.bmc {
            Some(b) => b.state.if_on(spawn),
            None => spawn(),
        }
    }

    /// Wait until the daemon logs a line matching `pred` (looking at every line of the
    /// current process, polled every 50 ms without holding the node for long).
    pub fn wait_log(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let (hit, exited, lines) = self.with_daemon(|d| {
                // A line already there is enough; only after an exit (and the wait for its
                // last lines) are the lines looked at again.
                let hit = d.json_lines().into_iter().find(|v| pred(v));
                if hit.is_some() || d.is_running() {
                    return (hit, None, d.lines());
                }
                let exited = Some(d.wait_exit(Duration::ZERO).ok());
                let hit = d.json_lines().into_iter().find(|v| pred(v));
                (hit, exited, d.lines())
            })?;
            if let Some(v) = hit {
                return Ok(v);
            }
            if let Some(status) = exited {
                return Err(HarnessError::Exited {
                    what: format!("{what} on {}", self.name),
                    status: status.map(|s| s.to_string()).unwrap_or_default(),
                    tail: tail_of(&lines, 40),
                });
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("{what} on {}", self.name),
                    timeout,
                    tail: tail_of(&lines, 40),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the current daemon process reaches `run` (its last startup stage done).
    /// On a node with a BMC, first wait until power is on and the node booted (after a
    /// power on, the daemon is spawned once libvirtd answers).
    pub fn wait_run(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        if let Some(b) = &self.bmc {
            b.state.wait_booted(timeout)?;
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        self.wait_log("the daemon to reach run", timeout, |v| {
            is_message(v, "stage complete") && str_field(v, "stage") == Some("keepalive")
        })
        .map(drop)
    }

    /// Wait for a log line of the current daemon process whose message contains `substr`.
    pub fn wait_for_message(&self, substr: &str, timeout: Duration) -> Result<Value> {
        self.wait_log(&format!("a message containing {substr:?}"), timeout, |v| {
            v.get("message")
                .and_then(Value::as_str)
                .is_some_and(|m| m.contains(substr))
        })
    }

    /// Send `sig` to the running daemon; returns the instant it was sent.
    fn signal(&self, sig: i32) -> Result<Instant> {
        let pid = self.pid().ok_or_else(|| {
            HarnessError::State(format!("node {}: the daemon is not running", self.name))
        })?;
        send_signal(pid, sig)?;
        Ok(Instant::now())
    }

    /// SIGKILL the daemon (by PID) and reap it. What it started (dnsmasq) and what it holds
    /// (addresses) stay, as after a crash. Returns the instant the signal was sent.
    pub fn kill9(&self) -> Result<Instant> {
        let at = self.signal(libc::SIGKILL)?;
        self.stopped.store(false, Ordering::SeqCst);
        self.with_daemon(|d| d.kill())??;
        Ok(at)
    }

    /// SIGKILL the daemon's guardian (`debvisord guard`, its child), then the daemon, as
    /// [`Node::kill9`]: the node's whole debvisord is gone and nothing self-fences its
    /// guests, which run on (holding their locks) until a fence powers the node off. An
    /// error if the daemon runs without a guardian. Returns the instant the daemon's signal
    /// was sent.
    pub fn kill9_with_guardian(&self) -> Result<Instant> {
        let daemon = self.pid().ok_or_else(|| {
            HarnessError::State(format!("node {}: the daemon is not running", self.name))
        })?;
        let guardians: Vec<u32> = self
            .processes()
            .into_iter()
            .map(|p| p.pid)
            .filter(|&pid| is_guardian_of(pid, daemon))
            .collect();
        if guardians.is_empty() {
            return Err(HarnessError::State(format!(
                "node {}: daemon {daemon} has no guardian",
                self.name
            )));
        }
        for pid in guardians {
            send_signal(pid, libc::SIGKILL)?;
        }
        self.kill9()
    }

    /// SIGTERM the daemon (a graceful shutdown begins; wait with [`Node::wait_exit`]).
    /// A SIGSTOPped daemon is continued first. Returns the instant SIGTERM was sent.
    pub fn sigterm(&self) -> Result<Instant> {
        if self.stopped.swap(false, Ordering::SeqCst) {
            self.signal(libc::SIGCONT)?;
        }
        self.signal(libc::SIGTERM)
    }

    /// Wait up to `timeout` for the daemon to exit; its exit code (`None`: killed by a
    /// signal).
    pub fn wait_exit(&self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.with_daemon(|d| {
                (!d.is_running()).then(|| d.wait_exit(Duration::ZERO).map(|s| s.code()))
            })?;
            if let Some(r) = done {
                return r;
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("the daemon of {} to exit", self.name),
                    timeout,
                    tail: self.tail(40),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL; a no-op if the daemon does not run.
    pub fn sigterm_and_wait(&self) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        self.sigterm()?;
        if self.wait_exit(STOP_GRACE).is_err() {
            self.with_daemon(|d| d.kill())??;
        }
        Ok(())
    }

    /// Freeze the daemon with SIGSTOP: its sockets stay open and unanswered, its lease runs
    /// out, whatever it holds stays. Returns the instant.
    pub fn stop(&self) -> Result<Instant> {
        let at = self.signal(libc::SIGSTOP)?;
        self.stopped.store(true, Ordering::SeqCst);
        Ok(at)
    }

    /// Resume a daemon frozen by [`Node::stop`] (SIGCONT). Returns the instant.
    pub fn cont(&self) -> Result<Instant> {
        let at = self.signal(libc::SIGCONT)?;
        self.stopped.store(false, Ordering::SeqCst);
        Ok(at)
    }

    /// Whether the daemon is frozen by [`Node::stop`].
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Stop the daemon (SIGTERM, SIGKILL after 10 s; SIGCONT first if frozen) if it runs, and
    /// spawn it again with the same state dir. Returns the instant of the new spawn.
    pub fn restart(&self) -> Result<Instant> {
        self.sigterm_and_wait()?;
        self.start()
    }

    /// Take the node's switch port down: the node keeps its addresses and processes but
    /// reaches nobody (its `eth0` loses carrier), as with a pulled cable. Returns the instant.
    pub fn cut_link(&self) -> Result<Instant> {
        switch::set_port_in(&self.switch_ns, &self.name, false)?;
        Ok(Instant::now())
    }

    /// Bring the node's switch port up again. Returns the instant.
    pub fn heal_link(&self) -> Result<Instant> {
        switch::set_port_in(&self.switch_ns, &self.name, true)?;
        Ok(Instant::now())
    }

    /// Flap the node's switch port in the background: `times` cycles of down for
    /// `period / 2`, then up for `period / 2`. The port is left up when the flapping ends or
    /// the returned [`Flap`] is dropped.
    pub fn flap_link(&self, period: Duration, times: u32) -> Result<Flap<'_>> {
        Flap::start(self.switch_ns.clone(), self.name.clone(), period, times)
    }

    /// Drop, in the node's namespace, every packet to and from the etcd members' client port
    /// (nft table [`CUT_TABLE`]): the node still reaches its peers and the etcd members' other
    /// ports, but its store requests and lease keepalives go unanswered. Returns the instant
    /// the rules were in place.
    pub fn cut_etcd(&self) -> Result<Instant> {
        let members = self
            .etcd_addrs
            .iter()
            .map(Ipv4Addr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet {CUT_TABLE} {{\n\
             \tchain out {{ type filter hook output priority -10; policy accept;\n\
             \t\tip daddr {{ {members} }} tcp dport {MEMBER_CLIENT_PORT} drop\n\t}}\n\
             \tchain in {{ type filter hook input priority -10; policy accept;\n\
             \t\tip saddr {{ {members} }} tcp sport {MEMBER_CLIENT_PORT} drop\n\t}}\n}}\n"
        );
        let path = self.dir.join("cut-etcd.nft");
        std::fs::write(&path, rules).ctx(|| format!("writing {}", path.display()))?;
        let path_s = path.display().to_string();
        self.exec_ok("nft", &["-f", &path_s])?;
        self.etcd_cut.store(true, Ordering::SeqCst);
        Ok(Instant::now())
    }

    /// Remove the rules of [`Node::cut_etcd`]. Returns the instant.
    pub fn heal_etcd(&self) -> Result<Instant> {
        self.exec_ok("nft", &["delete", "table", "inet", CUT_TABLE])?;
        self.etcd_cut.store(false, Ordering::SeqCst);
        Ok(Instant::now())
    }

    /// Whether [`Node::cut_etcd`] is in force.
    pub fn is_etcd_cut(&self) -> bool {
        self.etcd_cut.load(Ordering::SeqCst)
    }

    /// Run `program args…` in the node's namespace; its stdout, or an error with its stderr.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self
            .ns
            .exec_cmd(program, args)
            .output()
            .ctx(|| format!("running {program} in {}", self.ns.name()))?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: format!("{program} {}", args.join(" ")),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether one ICMP echo to `addr` from the node is answered within 1 s.
    pub fn ping(&self, addr: Ipv4Addr) -> bool {
        self.exec_ok(
            "busybox",
            &["ping", "-c", "1", "-W", "1", &addr.to_string()],
        )
        .is_ok()
    }

    /// Whether `addr` is on any link of the node's namespace (`ip -j addr`).
    pub fn has_addr(&self, addr: std::net::IpAddr) -> Result<bool> {
        let out = self.exec_ok("ip", &["-j", "addr", "show"])?;
        let v: Value = serde_json::from_str(&out)
            .map_err(|e| HarnessError::State(format!("ip -j addr: {e}")))?;
        let want = addr.to_string();
        Ok(v.as_array().into_iter().flatten().any(|link| {
            link["addr_info"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["local"].as_str() == Some(want.as_str()))
        }))
    }

    /// Run `debvisorctl args…` with the daemon's config, in the node's namespace.
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        self.with_daemon(|d| d.ctl(args))
    }

    /// [`Node::ctl`] that must succeed; returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl(args)?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: format!("debvisorctl {}", args.join(" ")),
                status: out.status.to_string(),
                stderr: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A DHCP guest on this node: a fresh namespace whose `eth0` (MAC `mac`) is a veth plugged
    /// into the node's bridge `dvbr<vni>`, which must exist (wait for it with
    /// [`Node::wait_link`]).
    pub fn dhcp_guest(&self, vni: u32, mac: &str) -> Result<DhcpGuest> {
        let n = self.guests.fetch_add(1, Ordering::SeqCst);
        DhcpGuest::plug(&self.ns, &format!("dvbr{vni}"), &format!("dvg{n}"), mac)
    }

    /// Wait until link `name` exists in the node's namespace.
    pub fn wait_link(&self, name: &str, timeout: Duration) -> Result<()> {
        wait_until(&format!("link {name} on {}", self.name), timeout, || {
            self.exec_ok("ip", &["link", "show", "dev", name])
                .ok()
                .map(drop)
        })
    }
}

/// Whether process `pid` is `debvisord guard …` spawned by daemon `daemon` (its parent, from
/// `/proc/<pid>/stat`; its first argument, from `/proc/<pid>/cmdline`).
fn is_guardian_of(pid: u32, daemon: u32) -> bool {
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // `pid (comm) state ppid …`: comm may hold spaces, so split after its `)`.
            let rest = s.rsplit_once(')')?.1;
            rest.split_whitespace().nth(1)?.parse::<u32>().ok()
        });
    let first_arg = std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|b| {
            b.split(|c| *c == 0)
                .nth(1)
                .map(|a| String::from_utf8_lossy(a).into_owned())
        });
    parent == Some(daemon) && first_arg.as_deref() == Some("guard")
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.stopped.load(Ordering::SeqCst) {
            if let Some(pid) = self.pid() {
                // SAFETY: kill(2) of our own daemon, frozen by `stop`, so it can shut down.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
            }
        }
    }
}
