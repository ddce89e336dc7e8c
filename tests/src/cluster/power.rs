//! A node's power: the process its BMC runs as the "machine", and what a power off does.
//!
//! A node's BMC (`ipmi_sim`, see the `bmc` module) runs `dvtest-node-power` as its
//! `startcmd`: while that process lives, the node's power is on. It is a supervisor, not a
//! parent: the node's daemon and libvirtd are the harness's children (the harness keeps
//! their logs and handles), started when the supervisor reports in. The supervisor:
//!
//! 1. connects to the harness's power socket and sends `on <pid>`; the harness then boots
//!    the node (network, libvirtd, daemon) unless this is the cluster's first boot;
//! 2. on SIGTERM (`ipmitool power off`: ipmi_sim sends it at once, SIGKILL after its
//!    `kill_wait`) sends `off <t>` and waits up to [`ACK_WAIT`] for `ack` (the harness
//!    stops starting processes of the node), then SIGKILLs every process in the node's
//!    network namespace — daemon, libvirtd, qemu, dnsmasq, the guard — over and over until
//!    none is left, takes the node's network down (`eth0` down and flushed, every other link
//!    deleted: what a reboot forgets), sends `down <t> <survivors>` and exits, so
//!    `power status` reads off only once the node is dead;
//! 3. if the harness goes away, powers the node off the same way and exits.
//!
//! Instants cross the process boundary as `CLOCK_MONOTONIC` nanoseconds, the clock of
//! [`Instant`] on Linux ([`instant_of_monotonic`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::libvirt_pair::process_netns_inode;

/// The supervisor binary (a harness binary of this package).
pub const SUPERVISOR_BIN: &str = "dvtest-node-power";
/// How long the supervisor waits for the harness's `ack` before killing anyway.
pub const ACK_WAIT: Duration = Duration::from_secs(1);
/// How long the supervisor keeps killing before reporting survivors.
pub const KILL_WAIT: Duration = Duration::from_secs(3);
/// The node's link to the switch (the one link a power off keeps, down and flushed).
pub const NODE_LINK: &str = "eth0";

/// A process running in a node's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeProcess {
    /// Its PID.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub comm: String,
}

/// Every live process whose network namespace has inode `ns_inode`, except those in
/// `spare` (zombies have no namespace any more and are not listed).
pub fn processes_in(ns_inode: u64, spare: &[u32]) -> Vec<NodeProcess> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<NodeProcess> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !spare.contains(pid) && process_netns_inode(*pid) == Some(ns_inode))
        .map(|pid| NodeProcess {
            pid,
            comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim_end().to_owned())
                .unwrap_or_default(),
        })
        .collect();
    out.sort_by_key(|p| p.pid);
    out
}

/// SIGKILL every process in namespace `ns_inode` (but `spare`), again and again (one may
/// fork meanwhile) until none is left or `timeout` passes; returns the survivors.
pub fn kill_all_in(ns_inode: u64, spare: &[u32], timeout: Duration) -> Vec<NodeProcess> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = processes_in(ns_inode, spare);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        for p in &left {
            // SAFETY: kill(2) of a process inside a node namespace the harness created: the
            // node is being powered off.
            unsafe { libc::kill(p.pid as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The inode of network namespace `name` (`/run/netns/<name>`).
pub fn netns_inode_of(name: &str) -> std::io::Result<u64> {
    Ok(std::fs::metadata(format!("/run/netns/{name}"))?.ino())
}

/// Run `ip -n <ns> args…`; its stdout, or its stderr as the error.
fn ip_in(ns: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Take a dead node's network down as a power off does: [`NODE_LINK`] down with its
/// addresses flushed, every other link but `lo` deleted (bridges, VXLANs, guest ports).
pub fn network_off(ns: &str) -> Result<(), String> {
    ip_in(ns, &["link", "set", NODE_LINK, "down"])?;
    ip_in(ns, &["addr", "flush", "dev", NODE_LINK])?;
    let links: serde_json::Value = serde_json::from_str(&ip_in(ns, &["-j", "link", "show"])?)
        .map_err(|e| format!("ip -j link show: {e}"))?;
    let mut errors = Vec::new();
    for name in links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| *n != "lo" && *n != NODE_LINK)
    {
        // A veth's peer may have gone with an earlier deletion.
        if let Err(e) = ip_in(ns, &["link", "del", name]) {
            if !e.contains("Cannot find device") {
                errors.push(e);
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The [`Instant`] of a `CLOCK_MONOTONIC` reading `ns` taken in any process of this
/// machine (`Instant` is that clock on Linux).
pub fn instant_of_monotonic(ns: u64) -> Instant {
    let (now_i, now_ns) = (Instant::now(), monotonic_ns());
    if ns <= now_ns {
        now_i
            .checked_sub(Duration::from_nanos(now_ns - ns))
            .unwrap_or(now_i)
    } else {
        now_i + Duration::from_nanos(ns - now_ns)
    }
}

/// What the supervisor sends and receives (one line each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PowerMsg {
    /// Power is on: the supervisor with this PID runs.
    On(u32),
    /// Power off began (SIGTERM received) at this monotonic instant.
    Off(u64),
    /// The node is dead (every process killed) since this monotonic instant; how many
    /// processes survived the kill loop.
    Down(u64, usize),
    /// The harness starts nothing more for this power cycle.
    Ack,
}

impl PowerMsg {
    /// Parse one line.
    pub fn parse(line: &str) -> Option<PowerMsg> {
        let mut w = line.split_whitespace();
        let msg = match (w.next()?, w.next(), w.next()) {
            ("on", Some(p), None) => PowerMsg::On(p.parse().ok()?),
            ("off", Some(t), None) => PowerMsg::Off(t.parse().ok()?),
            ("down", Some(t), Some(n)) => PowerMsg::Down(t.parse().ok()?, n.parse().ok()?),
            ("ack", None, None) => PowerMsg::Ack,
            _ => return None,
        };
        w.next().is_none().then_some(msg)
    }

    /// The line, with its newline.
    pub fn line(&self) -> String {
        match self {
            PowerMsg::On(p) => format!("on {p}\n"),
            PowerMsg::Off(t) => format!("off {t}\n"),
            PowerMsg::Down(t, n) => format!("down {t} {n}\n"),
            PowerMsg::Ack => "ack\n".to_owned(),
        }
    }
}

/// Set by the signal handler: power off requested.
static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_sig: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

/// The supervisor's arguments: `<power socket> <node netns> <harness pid>`.
struct Args {
    socket: String,
    netns: String,
    harness: u32,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    match args {
        [socket, netns, harness] => Ok(Args {
            socket: socket.clone(),
            netns: netns.clone(),
            harness: harness
                .parse()
                .map_err(|_| format!("not a PID: {harness:?}"))?,
        }),
        _ => Err(format!(
            "usage: {SUPERVISOR_BIN} <power socket> <node netns> <harness pid>, got {args:?}"
        )),
    }
}

/// The supervisor's main (the `dvtest-node-power` binary; `args` without the program
/// name). See the module documentation.
pub fn supervise(args: &[String]) -> ExitCode {
    let fail = |e: String| {
        eprintln!("{SUPERVISOR_BIN}: {e}");
        ExitCode::FAILURE
    };
    let args = match parse_args(args) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installing a handler that only stores to an atomic.
        unsafe { libc::signal(sig, on_term as *const () as libc::sighandler_t) };
    }
    let inode = match netns_inode_of(&args.netns) {
        Ok(i) => i,
        Err(e) => return fail(format!("netns {}: {e}", args.netns)),
    };
    let mut conn = match UnixStream::connect(&args.socket) {
        Ok(c) => c,
        Err(e) => return fail(format!("connecting to {}: {e}", args.socket)),
    };
    if let Err(e) = conn.write_all(PowerMsg::On(std::process::id()).line().as_bytes()) {
        return fail(format!("reporting power on: {e}"));
    }
    let Ok(reader) = conn.try_clone() else {
        return fail("cloning the power socket".to_owned());
    };
    let mut reader = BufReader::new(reader);
    if let Err(e) = conn.set_read_timeout(Some(Duration::from_millis(20))) {
        return fail(format!("power socket timeout: {e}"));
    }
    wait_for_power_off(&mut reader);
    power_off(&args, inode, &mut conn, &mut reader)
}

/// Block until SIGTERM arrives or the harness closes the socket.
fn wait_for_power_off(reader: &mut BufReader<UnixStream>) {
    let mut line = String::new();
    while !TERM.load(Ordering::SeqCst) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => line.clear(),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Tell the harness, wait for its ack, kill the node, take its network down, report.
fn power_off(
    args: &Args,
    inode: u64,
    conn: &mut UnixStream,
    reader: &mut BufReader<UnixStream>,
) -> ExitCode {
    let _ = conn.write_all(PowerMsg::Off(monotonic_ns()).line().as_bytes());
    let deadline = Instant::now() + ACK_WAIT;
    let mut line = String::new();
    while Instant::now() < deadline {
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) if PowerMsg::parse(&line) == Some(PowerMsg::Ack) => break,
            Ok(_) => line.clear(),
            Err(_) => {}
        }
    }
    let spare = [std::process::id(), args.harness];
    let survivors = kill_all_in(inode, &spare, KILL_WAIT);
    let dead_at = monotonic_ns();
    if !survivors.is_empty() {
        eprintln!("{SUPERVISOR_BIN}: survived SIGKILL: {survivors:?}");
    }
    if let Err(e) = network_off(&args.netns) {
        eprintln!("{SUPERVISOR_BIN}: network off: {e}");
    }
    let _ = conn.write_all(PowerMsg::Down(dead_at, survivors.len()).line().as_bytes());
    if survivors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_junk_is_refused() {
        for m in [
            PowerMsg::On(42),
            PowerMsg::Off(123_456_789),
            PowerMsg::Down(987, 2),
            PowerMsg::Ack,
        ] {
            assert_eq!(PowerMsg::parse(&m.line()), Some(m.clone()), "{m:?}");
        }
        for junk in ["", "on", "on x", "off 1 2", "down 1", "ack 1", "hello"] {
            assert_eq!(PowerMsg::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn monotonic_readings_map_onto_instants() {
        let before = Instant::now();
        let ns = monotonic_ns();
        let after = Instant::now();
        let i = instant_of_monotonic(ns);
        // The conversion itself may be off by the few microseconds between its two reads.
        assert!(i + Duration::from_millis(5) >= before && i <= after + Duration::from_millis(5));
        let later = instant_of_monotonic(ns + 1_000_000_000);
        let d = later.duration_since(i);
        assert!(
            d > Duration::from_millis(990) && d < Duration::from_millis(1010),
            "{d:?}"
        );
    }

    #[test]
    fn our_own_namespace_lists_us_unless_spared() {
        let me = std::process::id();
        let Some(ino) = process_netns_inode(me) else {
            return;
        };
        assert!(processes_in(ino, &[]).iter().any(|p| p.pid == me));
        assert!(!processes_in(ino, &[me]).iter().any(|p| p.pid == me));
    }

    #[test]
    fn arguments_are_checked() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(parse_args(&a(&["/s", "ns", "12"])).is_ok());
        assert!(parse_args(&a(&["/s", "ns"])).is_err());
        assert!(parse_args(&a(&["/s", "ns", "x"])).is_err());
    }
}
