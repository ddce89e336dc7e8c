//! A fake BMC per node: openipmi's `ipmi_sim`, an IPMI-over-LAN BMC that `ipmitool -I
//! lanplus` (and so the daemon's fencing) talks to, powering the node through the
//! `dvtest-node-power` supervisor (see the `power` and `boot` modules).
//!
//! Node `cN`'s BMC listens on `192.0.2.(150 + N)`, IPMI port 623, an address of the switch
//! namespace's bridge: outside the node's namespace, reachable from every node over the
//! cluster network (and from the switch namespace, where the harness runs `ipmitool`). User
//! [`BMC_USER`], one password for all BMCs of the cluster, in a mode-0600 file the daemons
//! are pointed at (as Ansible would distribute it).
//!
//! `ipmi_sim` runs in the switch namespace: `-c lan.conf -f node.emu -s <state dir> -n`,
//! with `startnow true` (the node is on when the cluster starts), `poweroff_wait 1` (no VM
//! serial connection, so SIGTERM goes at once), `kill_wait 5` (SIGKILL for a supervisor still
//! alive 5 s later; it normally exits within a few hundred ms) and the `serial 15 … codec
//! VM` line without which power control answers "Invalid data field".

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::boot::{watch, NodeParts, PowerEvent, PowerEventKind, PowerState};
use super::power::SUPERVISOR_BIN;
use super::{lock, wait_until};
use crate::daemon::harness_bin_path;
use crate::error::{file_tail, HarnessError, IoContext, Result};
use crate::libvirt::run_bounded;

/// The IPMI-over-LAN port every BMC listens on (the standard one, the daemon's default
/// `fencing.ipmi.port`: each BMC has its own address).
pub const IPMI_PORT: u16 = 623;
/// The BMC user (administrator privilege).
pub const BMC_USER: &str = "admin";
/// The host part of the first BMC's address: node `i` (0-based) has `192.0.2.(151 + i)`.
pub const BMC_HOST_BASE: u8 = 151;
/// First loopback port of the BMCs' (unused) VM serial interfaces: node `i` gets `+ i`.
const VM_SERIAL_BASE: u16 = 9100;
/// How long one harness `ipmitool` call may take.
const IPMITOOL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a BMC may take to start (its supervisor reporting in, IPMI answering).
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The BMC address of node `i` (0-based).
pub fn bmc_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, BMC_HOST_BASE + i as u8)
}

/// A node's power as its BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// `Chassis Power is on`.
    On,
    /// `Chassis Power is off`.
    Off,
}

/// The node's fake BMC (see the module documentation). Dropping it (the cluster does it
/// first on teardown) kills the supervisor (not the node: the cluster's teardown does that)
/// and `ipmi_sim`.
#[derive(Debug)]
pub struct Bmc {
    pub(super) state: Arc<PowerState>,
    addr: Ipv4Addr,
    password: String,
    password_file: PathBuf,
    switch_ns: String,
    dir: PathBuf,
    sim: Mutex<Option<Child>>,
    watcher: Mutex<Option<JoinHandle<()>>>,
    cut: AtomicBool,
    port_key: bool,
}

/// What [`Bmc::start`] needs besides the node.
pub(super) struct BmcSpec<'a> {
    pub index: usize,
    pub switch_ns: &'a str,
    pub password: &'a str,
    pub password_file: &'a Path,
    pub dir: PathBuf,
    pub port_key: bool,
}

/// Reject a path `ipmi_sim` would hand to `sh -c` unquoted.
fn shell_safe(s: &str) -> Result<&str> {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c))
    {
        Ok(s)
    } else {
        Err(HarnessError::State(format!(
            "{s:?} cannot be passed through ipmi_sim's startcmd"
        )))
    }
}

/// `lan.conf` of the BMC of node `index` at `addr`.
fn lan_conf(index: usize, addr: Ipv4Addr, password: &str, startcmd: &str) -> String {
    let port = VM_SERIAL_BASE + index as u16;
    let auths = "none md2 md5 straight";
    format!(
        "# debvisor test BMC of node c{n}\n\
         name \"c{n}\"\n\
         set_working_mc 0x20\n\
         \x20 startlan 1\n\
         \x20   addr {addr} {IPMI_PORT}\n\
         \x20   priv_limit admin\n\
         \x20   allowed_auths_callback {auths}\n\
         \x20   allowed_auths_user {auths}\n\
         \x20   allowed_auths_operator {auths}\n\
         \x20   allowed_auths_admin {auths}\n\
         \x20   guid {guid:032x}\n\
         \x20 endlan\n\
         \x20 serial 15 127.0.0.1 {port} codec VM\n\
         \x20 startcmd \"{startcmd}\"\n\
         \x20 startnow true\n\
         \x20 poweroff_wait 1\n\
         \x20 kill_wait 5\n\
         \x20 user 2 true \"{BMC_USER}\" \"{password}\" admin 10 {auths}\n",
        n = index + 1,
        guid = 0xdeb0_0000_0000_0000_0000_0000_0000_0000u128 + index as u128 + 1,
    )
}

/// The `.emu` file: one BMC management controller.
const NODE_EMU: &str = "mc_setbmc 0x20\n\
    mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n\
    sel_enable 0x20 1000 0x0a\n\
    mc_enable 0x20\n";

/// A fresh BMC password (16 hex digits from the kernel's random UUID).
pub(super) fn random_password() -> String {
    crate::libvirt::random_uuid()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect()
}

/// Write the cluster's BMC password file (mode 0600).
pub(super) fn write_password_file(path: &Path, password: &str) -> Result<()> {
    std::fs::write(path, format!("{password}\n")).ctx(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .ctx(|| format!("chmod 0600 {}", path.display()))
}

impl Bmc {
    /// Give the switch the BMC's address, write the configuration, start `ipmi_sim` and
    /// wait until its supervisor reported in (power on) and IPMI answers.
    pub(super) fn start(
        spec: BmcSpec<'_>,
        state: Arc<PowerState>,
        parts: NodeParts,
    ) -> Result<Bmc> {
        let addr = bmc_addr(spec.index);
        std::fs::create_dir_all(spec.dir.join("state"))
            .ctx(|| format!("creating {}", spec.dir.display()))?;
        crate::netns::ip(&[
            "-n",
            spec.switch_ns,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            super::switch::BRIDGE,
        ])?;
        let socket = spec.dir.join("power.sock");
        let listener =
            UnixListener::bind(&socket).ctx(|| format!("binding {}", socket.display()))?;
        listener
            .set_nonblocking(true)
            .ctx(|| "power socket non-blocking".to_owned())?;
        let bin = harness_bin_path(SUPERVISOR_BIN);
        let startcmd = format!(
            "{} {} {} {}",
            shell_safe(&bin.display().to_string())?,
            shell_safe(&socket.display().to_string())?,
            shell_safe(&parts.ns)?,
            std::process::id()
        );
        let conf = spec.dir.join("lan.conf");
        std::fs::write(&conf, lan_conf(spec.index, addr, spec.password, &startcmd))
            .ctx(|| format!("writing {}", conf.display()))?;
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600))
            .ctx(|| format!("chmod {}", conf.display()))?;
        let emu = spec.dir.join("node.emu");
        std::fs::write(&emu, NODE_EMU).ctx(|| format!("writing {}", emu.display()))?;
        let watcher_state = state.clone();
        let watcher = std::thread::Builder::new()
            .name(format!("bmc {}", state.node))
            .spawn(move || watch(listener, watcher_state, parts))
            .ctx(|| "spawning the BMC watcher".to_owned())?;
        let bmc = Bmc {
            state,
            addr,
            password: spec.password.to_owned(),
            password_file: spec.password_file.to_path_buf(),
            switch_ns: spec.switch_ns.to_owned(),
            dir: spec.dir,
            sim: Mutex::new(None),
            watcher: Mutex::new(Some(watcher)),
            cut: AtomicBool::new(false),
            port_key: spec.port_key,
        };
        bmc.spawn_sim()?;
        bmc.state.wait_booted(START_TIMEOUT).map_err(|e| {
            HarnessError::State(format!("{e}\n--- ipmi_sim ---\n{}", bmc.sim_log(20)))
        })?;
        wait_until(
            &format!("the BMC of {} to answer IPMI", bmc.state.node),
            START_TIMEOUT,
            || (bmc.power().ok() == Some(Power::On)).then_some(()),
        )?;
        Ok(bmc)
    }

    /// Spawn `ipmi_sim` in the switch namespace, its output in `ipmi_sim.log`.
    fn spawn_sim(&self) -> Result<()> {
        let log_path = self.dir.join("ipmi_sim.log");
        let log =
            std::fs::File::create(&log_path).ctx(|| format!("creating {}", log_path.display()))?;
        let log_err = log.try_clone().ctx(|| "cloning the log".to_owned())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.switch_ns, "ipmi_sim", "-c"])
            .arg(self.dir.join("lan.conf"))
            .arg("-f")
            .arg(self.dir.join("node.emu"))
            .arg("-s")
            .arg(self.dir.join("state"))
            .arg("-n")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .spawn()
            .ctx(|| "starting ipmi_sim (package openipmi)".to_owned())?;
        *lock(&self.sim) = Some(child);
        Ok(())
    }

    /// The last `n` lines of `ipmi_sim`'s output (its supervisors' stderr included).
    pub fn sim_log(&self, n: usize) -> String {
        file_tail(&self.dir.join("ipmi_sim.log"), n)
    }

    /// The BMC's address (on the switch, outside the node).
    pub fn address(&self) -> Ipv4Addr {
        self.addr
    }

    /// Its IPMI port ([`IPMI_PORT`]).
    pub fn port(&self) -> u16 {
        IPMI_PORT
    }

    /// Its user ([`BMC_USER`]).
    pub fn user(&self) -> &str {
        BMC_USER
    }

    /// The file holding the password (mode 0600, the same file for every BMC of the
    /// cluster).
    pub fn password_file(&self) -> &Path {
        &self.password_file
    }

    /// The daemon settings that publish this BMC (`fencing.ipmi.host`, `.user`,
    /// `.password_file`, and `.port` with [`super::ClusterBuilder::bmc_port_key`]) as
    /// `DEBVISOR_*` variables: what the cluster gives the node's daemon.
    pub fn daemon_env(&self) -> Vec<(String, String)> {
        daemon_env(self.addr, &self.password_file, self.port_key)
    }

    /// Run `ipmitool -I lanplus -C 3 -N 1 -R 2 -H <address> -p <port> -U admin -E args…`
    /// from the switch namespace (as an operator would; the password in `IPMI_PASSWORD`,
    /// stdin empty); its stdout, or an error with its stderr.
    pub fn ipmitool(&self, args: &[&str]) -> Result<String> {
        let addr = self.addr.to_string();
        let port = IPMI_PORT.to_string();
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.switch_ns,
            "ipmitool",
            "-I",
            "lanplus",
        ])
        .args(["-C", "3", "-N", "1", "-R", "2", "-H", &addr, "-p", &port])
        .args(["-U", BMC_USER, "-E"])
        .args(args)
        .env("IPMI_PASSWORD", &self.password);
        let what = format!("ipmitool {} (BMC of {})", args.join(" "), self.state.node);
        let out = run_bounded(&mut cmd, &what, IPMITOOL_TIMEOUT)?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: what,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The power state, read with `ipmitool power status`. It reads off only once the
    /// node is dead (the supervisor exits after killing it).
    pub fn power(&self) -> Result<Power> {
        let out = self.ipmitool(&["power", "status"])?;
        let t = out.trim();
        if t.ends_with(" on") {
            Ok(Power::On)
        } else if t.ends_with(" off") {
            Ok(Power::Off)
        } else {
            Err(HarnessError::State(format!("ipmitool power status: {t:?}")))
        }
    }

    /// `ipmitool power off` (a hard power off); returns the instant it was sent. The node
    /// dies within about half a second; wait with [`Bmc::wait_down`].
    pub fn power_off(&self) -> Result<Instant> {
        let at = Instant::now();
        self.ipmitool(&["power", "off"])?;
        Ok(at)
    }

    /// `ipmitool power on`; returns the instant it was sent. The harness then boots the node
    /// (network, libvirtd, daemon with its state dir); wait with `Node::wait_run`.
    pub fn power_on(&self) -> Result<Instant> {
        let at = Instant::now();
        self.ipmitool(&["power", "on"])?;
        Ok(at)
    }

    /// `ipmitool power cycle` (off, then on); returns the instant it was sent.
    pub fn power_cycle(&self) -> Result<Instant> {
        let at = Instant::now();
        self.ipmitool(&["power", "cycle"])?;
        Ok(at)
    }

    /// Poll `power status` until it reads `want`; the instant it did.
    pub fn wait_power(&self, want: Power, timeout: Duration) -> Result<Instant> {
        wait_until(
            &format!("the BMC of {} to read power {want:?}", self.state.node),
            timeout,
            || (self.power().ok() == Some(want)).then(Instant::now),
        )
    }

    /// Wait until the node died (its supervisor, or the harness, killed every process)
    /// after `since`; the instant the last process was seen dead.
    pub fn wait_down(&self, since: Instant, timeout: Duration) -> Result<Instant> {
        wait_until(
            &format!("node {} to be down", self.state.node),
            timeout,
            || {
                self.power_log().into_iter().find_map(|e| {
                    (e.at >= since && matches!(e.kind, PowerEventKind::Down { .. })).then_some(e.at)
                })
            },
        )
    }

    /// PIDs of `ipmi_sim` and of the supervisor (the node's "power"), those that run.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = lock(&self.sim)
            .as_mut()
            .and_then(|c| matches!(c.try_wait(), Ok(None)).then(|| c.id()))
            .into_iter()
            .collect();
        pids.extend(*lock(&self.state.supervisor));
        pids
    }

    /// Whether power is on, as the harness knows it (no IPMI call).
    pub fn is_on(&self) -> bool {
        self.state.is_on()
    }

    /// Every power event so far, in order.
    pub fn power_log(&self) -> Vec<PowerEvent> {
        lock(&self.state.log).clone()
    }

    /// Make the BMC unreachable (an nft rule in the switch namespace drops every packet to
    /// its IPMI port: `ipmitool` times out, for the node's peers and the harness alike).
    /// Returns the instant.
    pub fn cut(&self) -> Result<Instant> {
        let table = self.cut_table();
        let rules = format!(
            "table inet {table} {{\n\tchain in {{ type filter hook input priority -10; \
             policy accept;\n\t\tip daddr {} udp dport {IPMI_PORT} drop\n\t}}\n}}\n",
            self.addr
        );
        let path = self.dir.join("cut.nft");
        std::fs::write(&path, rules).ctx(|| format!("writing {}", path.display()))?;
        self.nft(&["-f", &path.display().to_string()])?;
        self.cut.store(true, Ordering::SeqCst);
        Ok(Instant::now())
    }

    /// Undo [`Bmc::cut`]. Returns the instant.
    pub fn heal(&self) -> Result<Instant> {
        self.nft(&["delete", "table", "inet", &self.cut_table()])?;
        self.cut.store(false, Ordering::SeqCst);
        Ok(Instant::now())
    }

    /// Whether [`Bmc::cut`] is in force.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    fn cut_table(&self) -> String {
        format!("dvtest_bmc_{}", self.state.node)
    }

    fn nft(&self, args: &[&str]) -> Result<()> {
        crate::netns::ip(&[&["netns", "exec", &self.switch_ns, "nft"], args].concat())
    }

    /// Teardown (idempotent): start nothing more, kill the supervisor by PID (not the node:
    /// the cluster's teardown stops it as usual), stop `ipmi_sim`, join the threads.
    pub(super) fn shutdown(&self) {
        self.state.close();
        if let Some(pid) = lock(&self.state.supervisor).take() {
            if is_supervisor(pid) {
                // SAFETY: kill(2) of the supervisor our ipmi_sim started (checked by name).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        if let Some(mut child) = lock(&self.sim).take() {
            // SAFETY: kill(2) of our own unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(h) = lock(&self.watcher).take() {
            let _ = h.join();
        }
    }
}

impl Drop for Bmc {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether `pid` runs the supervisor binary.
fn is_supervisor(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        c.split(|b| *b == 0)
            .next()
            .is_some_and(|p| p.ends_with(SUPERVISOR_BIN.as_bytes()))
    })
}

/// The daemon settings publishing a BMC at `addr` with the cluster's password file:
/// `fencing.ipmi.host`, `.user`, `.password_file`, and `.port` ([`IPMI_PORT`]) when
/// `with_port` (a daemon without that key refuses the variable: an unknown `DEBVISOR_*`
/// variable is an error).
pub(super) fn daemon_env(
    addr: Ipv4Addr,
    password_file: &Path,
    with_port: bool,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("DEBVISOR_FENCING_IPMI_HOST".to_owned(), addr.to_string()),
        ("DEBVISOR_FENCING_IPMI_USER".to_owned(), BMC_USER.to_owned()),
        (
            "DEBVISOR_FENCING_IPMI_PASSWORD_FILE".to_owned(),
            password_file.display().to_string(),
        ),
    ];
    if with_port {
        env.push((
            "DEBVISOR_FENCING_IPMI_PORT".to_owned(),
            IPMI_PORT.to_string(),
        ));
    }
    env
}

/// Whether `tool` is an executable file in a `$PATH` directory.
fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| {
        std::fs::metadata(d.join(tool))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Whether the fake BMCs can run here (`ipmi_sim` of package `openipmi`, and `ipmitool`);
/// if not, [`crate::skip::skip_or_fail`] (a failure under `DEBVISOR_REQUIRE_ALL=1`) and
/// false: the calling test returns.
pub fn require_ipmi_sim() -> bool {
    for (tool, package) in [("ipmi_sim", "openipmi"), ("ipmitool", "ipmitool")] {
        if !on_path(tool) {
            crate::skip::skip_or_fail(
                &format!("{tool} not installed (package {package}; scripts/deps.sh)"),
                crate::skip::SkipKind::Environment,
            );
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_has_what_ipmi_sim_needs() {
        let c = lan_conf(1, bmc_addr(1), "pw", "/bin/x /s ns 1");
        for want in [
            "addr 192.0.2.152 623",
            "serial 15 127.0.0.1 9101 codec VM",
            "startcmd \"/bin/x /s ns 1\"",
            "startnow true",
            "user 2 true \"admin\" \"pw\" admin 10 none md2 md5 straight",
            "endlan",
        ] {
            assert!(c.contains(want), "{want:?} missing in\n{c}");
        }
        assert!(NODE_EMU.contains("mc_enable 0x20"));
    }

    #[test]
    fn startcmd_arguments_must_be_plain() {
        assert!(shell_safe("/tmp/dvcl-1-AbC/c1/bmc/power.sock").is_ok());
        for bad in ["", "a b", "a;b", "$(x)", "a\"b", "a'b"] {
            assert!(shell_safe(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passwords_are_fresh_hex() {
        let (a, b) = (random_password(), random_password());
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn the_daemon_learns_host_user_and_password_file() {
        let env = daemon_env(bmc_addr(0), Path::new("/x/bmc.password"), false);
        assert_eq!(
            env,
            [
                (
                    "DEBVISOR_FENCING_IPMI_HOST".to_owned(),
                    "192.0.2.151".to_owned()
                ),
                ("DEBVISOR_FENCING_IPMI_USER".to_owned(), "admin".to_owned()),
                (
                    "DEBVISOR_FENCING_IPMI_PASSWORD_FILE".to_owned(),
                    "/x/bmc.password".to_owned()
                ),
            ]
        );
        let with_port = daemon_env(bmc_addr(0), Path::new("/x/bmc.password"), true);
        assert_eq!(
            with_port.last(),
            Some(&("DEBVISOR_FENCING_IPMI_PORT".to_owned(), "623".to_owned()))
        );
    }

    #[test]
    fn tools_are_found_on_the_path() {
        assert!(on_path("ls"));
        assert!(!on_path("no-such-tool-dvtest"));
    }
}
