//! Isolated libvirtd instances on one machine, for real live migration in tests.
//!
//! Each [`IsolatedLibvirt`] is a foreground `libvirtd` (we hold its PID) inside a network
//! namespace the test created and a mount + UTS namespace of its own: temp directories are
//! bind-mounted over `/run/libvirt`, `/var/lib/libvirt`, `/etc/libvirt`, `/var/log/libvirt`
//! and `/var/cache/libvirt`, it has its own `host_uuid` and hostname, and it listens on TCP
//! (no auth) at its namespace address. Two of them look like two hosts to libvirt, so a
//! peer-to-peer migration really moves the guest's qemu process from one to the other.
//!
//! Tests reach an instance from the host through its unix socket ([`IsolatedLibvirt::local_uri`]);
//! instances reach each other over TCP ([`IsolatedLibvirt::peer_uri`]). qemu logs to files
//! (`stdio_handler = "file"`), so no virtlogd is needed; cgroups and security drivers are off
//! so two instances never share host state.
//!
//! Drop destroys every domain, kills the instance's qemu processes (found by its pid files)
//! and libvirtd by PID, and removes its temp directory. [`sweep_stale`] removes what a killed
//! test process left behind.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use debvisor_daemon::hypervisor::Libvirt;

use crate::error::{file_tail, HarnessError, IoContext, Result};
use crate::libvirt::{random_uuid, run_bounded};
use crate::netns::NetNs;

/// libvirtd's TCP port (`listen_tcp`).
pub const LIBVIRT_TCP_PORT: u16 = 16509;
/// The /24 a [`LibvirtPair`] (A is `.1`, B is `.2`) or a [`LibvirtCluster`] lives in. Each
/// has namespaces of its own, so those of parallel tests do not collide.
pub const PAIR_SUBNET: [u8; 3] = [10, 231, 0];
/// An address in [`PAIR_SUBNET`] that no instance has: migrating there fails.
pub const PAIR_UNREACHABLE: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 99);
/// Prefix of instance temp directories: `dvlv-<test pid>-<label>-…`.
const DIR_PREFIX: &str = "dvlv-";
/// Prefix of the pair's network namespaces (`lvmig-<test pid>-<n>`).
const NETNS_PREFIX: &str = "lvmig";
/// Directories an instance gets a private copy of: (name under its temp dir, mount point).
const PRIVATE_DIRS: [(&str, &str); 5] = [
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("etc", "/etc/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];
/// How long an instance gets to answer after being spawned.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Drop waits for libvirt to destroy the domains before killing by PID.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(30);

/// A libvirtd in its own network, mount and UTS namespaces; everything is torn down on drop.
pub struct IsolatedLibvirt {
    label: String,
    hostname: String,
    host_uuid: String,
    addr: Ipv4Addr,
    netns_inode: u64,
    root: Option<tempfile::TempDir>,
    child: Option<Child>,
    pid: u32,
}

/// Reject labels that would not make a clean hostname, path component and log field.
fn check_label(label: &str) -> Result<()> {
    let ok = !label.is_empty()
        && label.len() <= 20
        && label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !label.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(HarnessError::State(format!(
            "invalid libvirt instance label {label:?} (1-20 of [a-z0-9-], not starting with '-')"
        )))
    }
}

fn c_string(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| HarnessError::State(format!("NUL byte in {s:?}")))
}

fn path_c_string(p: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| HarnessError::State(format!("NUL byte in {}", p.display())))
}

/// The network namespace inode of process `pid` (`/proc/<pid>/ns/net`), `None` if it is gone.
pub fn process_netns_inode(pid: u32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// The inode identifying network namespace `ns` (compare with [`process_netns_inode`]).
pub fn netns_inode(ns: &NetNs) -> Result<u64> {
    let path = format!("/run/netns/{}", ns.name());
    Ok(std::fs::metadata(&path)
        .ctx(|| format!("stat {path}"))?
        .ino())
}

fn process_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; its state letter is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The qemu PIDs named by the pid files in `qemu_run_dir` (`<name>.pid`), as (name, pid).
fn pid_files(qemu_run_dir: &Path) -> Vec<(String, u32)> {
    let Ok(entries) = std::fs::read_dir(qemu_run_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pid"))
        else {
            continue;
        };
        if let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        {
            out.push((name.to_string(), pid));
        }
    }
    out.sort();
    out
}

/// Whether `pid` runs a qemu system emulator.
fn is_qemu(pid: u32) -> bool {
    cmdline(pid)
        .first()
        .is_some_and(|p| p.contains("qemu-system"))
}

/// SIGKILL `pid` if it is a live qemu process inside network namespace `ns_inode` (so a
/// reused PID or a stale pid file never hits anything else).
fn kill_qemu(pid: u32, ns_inode: u64) -> bool {
    if !is_qemu(pid) || process_netns_inode(pid) != Some(ns_inode) || !process_alive(pid) {
        return false;
    }
    // SAFETY: kill(2) of a qemu process started by an instance we own (checked above).
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) == 0 }
}

fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn libvirtd_conf(addr: Ipv4Addr, host_uuid: &str) -> String {
    format!(
        "# debvisor test instance: TCP without auth on the namespace address only.
listen_tls = 0
listen_tcp = 1
tcp_port = \"{LIBVIRT_TCP_PORT}\"
listen_addr = \"{addr}\"
auth_tcp = \"none\"
auth_unix_rw = \"none\"
auth_unix_ro = \"none\"
unix_sock_group = \"root\"
unix_sock_ro_perms = \"0700\"
unix_sock_rw_perms = \"0700\"
unix_sock_admin_perms = \"0700\"
host_uuid = \"{host_uuid}\"
log_outputs = \"3:stderr\"
"
    )
}

fn qemu_conf(addr: Ipv4Addr) -> String {
    format!(
        "# debvisor test instance: migration over the namespace address, no host-wide state.
migration_host = \"{addr}\"
migration_address = \"{addr}\"
stdio_handler = \"file\"
cgroup_controllers = [ ]
security_driver = \"none\"
user = \"root\"
group = \"root\"
"
    )
}

/// The instance's /etc/libvirt: the host's top-level config files (client `libvirt.conf`
/// etc.), then our own `libvirtd.conf` and `qemu.conf` (written whole: libvirt reads the
/// first of duplicate keys, so appending would not override). No domain, network or
/// nwfilter definitions are copied.
fn write_config(etc: &Path, addr: Ipv4Addr, host_uuid: &str) -> Result<()> {
    if let Ok(entries) = std::fs::read_dir("/etc/libvirt") {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                let to = etc.join(e.file_name());
                std::fs::copy(e.path(), &to)
                    .ctx(|| format!("copying {} to {}", e.path().display(), to.display()))?;
            }
        }
    }
    std::fs::create_dir_all(etc.join("qemu")).ctx(|| format!("creating {}/qemu", etc.display()))?;
    for (name, text) in [
        ("libvirtd.conf", libvirtd_conf(addr, host_uuid)),
        ("qemu.conf", qemu_conf(addr)),
    ] {
        let path = etc.join(name);
        let mut f = File::create(&path).ctx(|| format!("creating {}", path.display()))?;
        f.write_all(text.as_bytes())
            .ctx(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Where the host's libvirtd caches what it probed of each qemu binary.
const HOST_CAPS_CACHE: &str = "/var/cache/libvirt/qemu/capabilities";

/// Copy the host's qemu capabilities cache into the instance's `/var/cache/libvirt`:
/// probing every qemu binary takes seconds per instance. libvirt checks each entry against
/// the binaries, itself and the host CPU and re-probes whatever is stale, so a copy is
/// never wrong, only possibly useless.
fn seed_capabilities_cache(cache: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(HOST_CAPS_CACHE) else {
        return Ok(());
    };
    let to_dir = cache.join("qemu").join("capabilities");
    std::fs::create_dir_all(&to_dir).ctx(|| format!("creating {}", to_dir.display()))?;
    for e in entries.flatten() {
        let from = e.path();
        if e.file_type().is_ok_and(|t| t.is_file()) && from.extension().is_some_and(|x| x == "xml")
        {
            let to = to_dir.join(e.file_name());
            std::fs::copy(&from, &to)
                .ctx(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

impl IsolatedLibvirt {
    /// Start a libvirtd named `label` (also its hostname: `dvlv-<label>`) in network
    /// namespace `ns`, listening on TCP at `addr` (which must already be configured on an
    /// interface in `ns`). Returns once it answers on its unix socket and on TCP.
    ///
    /// `ns` must outlive the instance (drop the instance first).
    pub fn start(label: &str, ns: &NetNs, addr: Ipv4Addr) -> Result<IsolatedLibvirt> {
        check_label(label)?;
        for (_, target) in PRIVATE_DIRS {
            // Mount points must exist; the libvirt packages create them on a normal host.
            std::fs::create_dir_all(target).ctx(|| format!("creating {target}"))?;
        }
        let root = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-{label}-", std::process::id()))
            .tempdir()
            .ctx(|| "creating the instance temp dir".to_string())?;
        let host_uuid = random_uuid();
        let hostname = format!("dvlv-{label}");
        let mut binds = Vec::new();
        for (name, target) in PRIVATE_DIRS {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).ctx(|| format!("creating {}", dir.display()))?;
            binds.push((path_c_string(&dir)?, c_string(target)?));
        }
        write_config(&root.path().join("etc"), addr, &host_uuid)?;
        seed_capabilities_cache(&root.path().join("cache"))?;

        let ns_path = format!("/run/netns/{}", ns.name());
        let ns_file = File::open(&ns_path).ctx(|| format!("opening {ns_path}"))?;
        let netns_inode = ns_file.metadata().ctx(|| format!("stat {ns_path}"))?.ino();
        let log_path = root.path().join("libvirtd.log");
        let log = File::create(&log_path).ctx(|| format!("creating {}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .ctx(|| format!("cloning {}", log_path.display()))?;
        let pid_file = root.path().join("libvirtd.pid");

        let mut cmd = Command::new("libvirtd");
        cmd.arg("--listen")
            .arg("--pid-file")
            .arg(&pid_file)
            .env_remove("LIBVIRT_DEFAULT_URI")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0);
        let ns_fd = ns_file.as_raw_fd();
        let slash = c_string("/")?;
        let host_c = c_string(&hostname)?;
        let host_len = hostname.len();
        // SAFETY: the closure runs between fork and exec and only makes raw syscalls on
        // data prepared before the fork (no allocation, no locks); `ns_file` stays open in
        // the parent until spawn returns, so `ns_fd` is valid in the child.
        unsafe {
            cmd.pre_exec(move || {
                let check = |r: libc::c_int| {
                    if r == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                check(libc::setns(ns_fd, libc::CLONE_NEWNET))?;
                check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS))?;
                check(libc::mount(
                    std::ptr::null(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for (src, dst) in &binds {
                    check(libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))?;
                }
                check(libc::sethostname(host_c.as_ptr(), host_len))
            });
        }
        let child = cmd
            .spawn()
            .ctx(|| format!("starting libvirtd {label} in netns {}", ns.name()))?;
        drop(ns_file);
        let pid = child.id();
        let mut inst = IsolatedLibvirt {
            label: label.to_string(),
            hostname,
            host_uuid,
            addr,
            netns_inode,
            root: Some(root),
            child: Some(child),
            pid,
        };
        inst.wait_ready(ns)?;
        eprintln!(
            "debvisor-tests: libvirtd instance={} pid={pid} netns={} addr={addr} started",
            inst.label,
            ns.name()
        );
        Ok(inst)
    }

    /// Wait until libvirtd answers `virsh version` on its socket and accepts TCP at its
    /// address (from inside its namespace); fail early with its log if it exits.
    fn wait_ready(&mut self, ns: &NetNs) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let sock = self.socket_path();
        let uri = self.local_uri();
        let tcp = SocketAddr::from((self.addr, LIBVIRT_TCP_PORT));
        let mut last = String::new();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child
                    .try_wait()
                    .ctx(|| format!("waiting for libvirtd {}", self.label))?
                {
                    self.child = None;
                    return Err(HarnessError::Exited {
                        what: format!("libvirtd {} to answer", self.label),
                        status: status.to_string(),
                        tail: self.log_tail(30),
                    });
                }
            }
            if UnixStream::connect(&sock).is_ok() {
                match run_bounded(
                    Command::new("virsh").args(["-c", &uri, "version"]),
                    "virsh version",
                    Duration::from_secs(10),
                ) {
                    Ok(out) if out.status.success() => {
                        let tcp_ok = ns.run(|| {
                            TcpStream::connect_timeout(&tcp, Duration::from_secs(1)).map(|_| ())
                        })?;
                        match tcp_ok {
                            Ok(()) => return Ok(()),
                            Err(e) => last = format!("TCP {tcp}: {e}"),
                        }
                    }
                    Ok(out) => last = String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("libvirtd {} to answer on {uri} and {tcp}", self.label),
                    timeout: START_TIMEOUT,
                    tail: format!("{last}\n{}", self.log_tail(30)),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn root(&self) -> &Path {
        // `root` is only taken by Drop.
        self.root
            .as_ref()
            .map(|r| r.path())
            .unwrap_or(Path::new("/nonexistent"))
    }

    fn socket_path(&self) -> PathBuf {
        self.run_dir().join("libvirt-sock")
    }

    /// A URI for this instance usable from the host's mount namespace (tests, a debvisord
    /// process): its read-write unix socket.
    pub fn local_uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.socket_path().display()
        )
    }

    /// The URI other instances use to reach this one (peer-to-peer migration destination).
    pub fn peer_uri(&self) -> String {
        format!("qemu+tcp://{}/system", self.addr)
    }

    /// A driver handle on [`local_uri`](Self::local_uri) that reads qemu PIDs from this
    /// instance's pid files.
    pub fn libvirt(&self, timeout: Duration) -> Libvirt {
        Libvirt::new(&self.local_uri(), timeout).with_qemu_run_dir(Some(self.qemu_run_dir()))
    }

    /// libvirtd's PID.
    pub fn libvirtd_pid(&self) -> u32 {
        self.pid
    }

    /// The label given to [`start`](Self::start).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Its hostname (in its UTS namespace).
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Its `host_uuid` (what libvirt compares to refuse migrating to the same host).
    pub fn host_uuid(&self) -> &str {
        &self.host_uuid
    }

    /// Its TCP address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The inode of its network namespace (compare with [`process_netns_inode`]).
    pub fn netns_inode(&self) -> u64 {
        self.netns_inode
    }

    /// Host path of its `/run/libvirt`.
    pub fn run_dir(&self) -> PathBuf {
        self.root().join("run")
    }

    /// Host path of its `/run/libvirt/qemu` (qemu pid files).
    pub fn qemu_run_dir(&self) -> PathBuf {
        self.run_dir().join("qemu")
    }

    /// Host path of its `/var/log/libvirt/qemu` (one log per guest).
    pub fn qemu_log_dir(&self) -> PathBuf {
        self.root().join("log").join("qemu")
    }

    /// The qemu processes it runs now, per its pid files: (domain name, PID). Files naming
    /// something else (the driver's own lock `driver.pid` holds libvirtd's PID) are skipped.
    pub fn qemu_pids(&self) -> Vec<(String, u32)> {
        pid_files(&self.qemu_run_dir())
            .into_iter()
            .filter(|(_, pid)| is_qemu(*pid) && process_alive(*pid))
            .collect()
    }

    /// The last `n` lines of libvirtd's own log (stdout and stderr).
    pub fn log_tail(&self, n: usize) -> String {
        file_tail(&self.root().join("libvirtd.log"), n)
    }

    /// Destroy and undefine every domain through libvirt, bounded by [`DESTROY_TIMEOUT`]
    /// (a hung libvirtd leaves its helper thread behind; Drop then kills by PID).
    fn destroy_domains(&self) -> std::result::Result<(), String> {
        let lv = Libvirt::new(&self.local_uri(), Duration::from_secs(10));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = (|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async {
                    let mut errors = Vec::new();
                    let domains = lv.list().await.map_err(|e| e.to_string())?;
                    for d in domains {
                        if let Err(e) = lv.destroy(&d.uuid).await {
                            errors.push(e.to_string());
                        }
                        if let Err(e) = lv.undefine(&d.uuid).await {
                            errors.push(e.to_string());
                        }
                    }
                    lv.close().await;
                    if errors.is_empty() {
                        Ok(())
                    } else {
                        Err(errors.join("; "))
                    }
                })
            })();
            let _ = tx.send(r);
        });
        rx.recv_timeout(DESTROY_TIMEOUT)
            .unwrap_or_else(|_| Err(format!("destroying domains took over {DESTROY_TIMEOUT:?}")))
    }

    /// Stop libvirtd: SIGTERM, then SIGKILL after 10 s; reaps it.
    fn stop_libvirtd(&mut self) -> std::result::Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(());
        }
        // SAFETY: kill(2) of our own child, which has not been reaped yet.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    return child
                        .wait()
                        .map(|_| ())
                        .map_err(|e| format!("reaping libvirtd {}: {e}", self.pid));
                }
            }
        }
    }
}

impl Drop for IsolatedLibvirt {
    fn drop(&mut self) {
        let mut errors = Vec::new();
        let before: Vec<u32> = self.qemu_pids().into_iter().map(|(_, p)| p).collect();
        if self.child.is_some() {
            if let Err(e) = self.destroy_domains() {
                errors.push(format!("destroying domains: {e}"));
            }
        }
        let mut qemu: Vec<u32> = self.qemu_pids().into_iter().map(|(_, p)| p).collect();
        qemu.extend(before);
        qemu.sort_unstable();
        qemu.dedup();
        for pid in &qemu {
            if kill_qemu(*pid, self.netns_inode) {
                errors.push(format!("qemu {pid} was still running: killed"));
            }
        }
        if let Err(e) = self.stop_libvirtd() {
            errors.push(e);
        }
        let left = wait_gone(&qemu, Duration::from_secs(10));
        if !left.is_empty() {
            errors.push(format!("qemu processes {left:?} did not exit"));
        }
        if let Some(root) = self.root.take() {
            let path = root.path().display().to_string();
            if let Err(e) = root.close() {
                errors.push(format!("removing {path}: {e}"));
            }
        }
        if !errors.is_empty() {
            eprintln!(
                "debvisor-tests: libvirtd instance={} cleanup: {}",
                self.label,
                errors.join("; ")
            );
        }
    }
}

/// Two [`IsolatedLibvirt`] instances, `a` at `10.231.0.1` and `b` at `10.231.0.2`, each
/// in its own network namespace, wired by a veth pair. Dropping it stops both instances,
/// then deletes the namespaces.
pub struct LibvirtPair {
    /// The first instance (label `a`).
    pub a: IsolatedLibvirt,
    /// The second instance (label `b`).
    pub b: IsolatedLibvirt,
    // Dropped after the instances (field order).
    ns_a: NetNs,
    ns_b: NetNs,
}

impl LibvirtPair {
    /// Create the namespaces and the veth between them, then start both instances.
    /// Leftovers of killed test processes are swept first ([`sweep_stale`]).
    pub fn start() -> Result<LibvirtPair> {
        sweep_stale();
        let ns_a = NetNs::create(NETNS_PREFIX)?;
        let ns_b = NetNs::create(NETNS_PREFIX)?;
        let [x, y, z] = PAIR_SUBNET;
        let addr_a = Ipv4Addr::new(x, y, z, 1);
        let addr_b = Ipv4Addr::new(x, y, z, 2);
        // Created directly inside the namespaces: the names never touch the host's.
        ns_a.ip(&[
            "link",
            "add",
            "mig0",
            "type",
            "veth",
            "peer",
            "name",
            "mig0",
            "netns",
            ns_b.name(),
        ])?;
        for (ns, addr) in [(&ns_a, addr_a), (&ns_b, addr_b)] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "mig0"])?;
            ns.ip(&["link", "set", "mig0", "up"])?;
        }
        let a = IsolatedLibvirt::start("a", &ns_a, addr_a)?;
        let b = IsolatedLibvirt::start("b", &ns_b, addr_b)?;
        Ok(LibvirtPair { a, b, ns_a, ns_b })
    }

    /// The namespace of `a`.
    pub fn netns_a(&self) -> &NetNs {
        &self.ns_a
    }

    /// The namespace of `b`.
    pub fn netns_b(&self) -> &NetNs {
        &self.ns_b
    }

    /// A peer URI in the pair's subnet where nothing listens (no host at that address).
    pub fn unreachable_peer_uri(&self) -> String {
        format!("qemu+tcp://{PAIR_UNREACHABLE}/system")
    }
}

/// Most instances in a [`LibvirtCluster`] (addresses `.1` to `.50` of [`PAIR_SUBNET`]).
pub const CLUSTER_MAX: usize = 50;

/// `count` [`IsolatedLibvirt`] instances labelled `n0`, `n1`, … at `10.231.0.1`, `.2`, …,
/// each in its own network namespace, all on one bridge in a further namespace (for
/// drain/placement tests with more than two hosts). Dropping it stops every instance, then
/// deletes the namespaces.
pub struct LibvirtCluster {
    nodes: Vec<IsolatedLibvirt>,
    // Dropped after the instances (field order).
    node_ns: Vec<NetNs>,
    bridge_ns: NetNs,
}

impl LibvirtCluster {
    /// Create the bridge namespace, one namespace per node wired to the bridge by a veth,
    /// and start the instances (2 to [`CLUSTER_MAX`]).
    pub fn start(count: usize) -> Result<LibvirtCluster> {
        if !(2..=CLUSTER_MAX).contains(&count) {
            return Err(HarnessError::State(format!(
                "a libvirt cluster has 2 to {CLUSTER_MAX} nodes, not {count}"
            )));
        }
        sweep_stale();
        let bridge_ns = NetNs::create(NETNS_PREFIX)?;
        bridge_ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge_ns.ip(&["link", "set", "br0", "up"])?;
        let mut cluster = LibvirtCluster {
            nodes: Vec::new(),
            node_ns: Vec::new(),
            bridge_ns,
        };
        let [x, y, z] = PAIR_SUBNET;
        for i in 0..count {
            let ns = NetNs::create(NETNS_PREFIX)?;
            let port = format!("p{i}");
            ns.ip(&[
                "link",
                "add",
                "mig0",
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                cluster.bridge_ns.name(),
            ])?;
            cluster
                .bridge_ns
                .ip(&["link", "set", &port, "master", "br0", "up"])?;
            // `i < CLUSTER_MAX`, so the host part fits.
            let addr = Ipv4Addr::new(x, y, z, i as u8 + 1);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "mig0"])?;
            ns.ip(&["link", "set", "mig0", "up"])?;
            cluster.node_ns.push(ns);
        }
        for (i, ns) in cluster.node_ns.iter().enumerate() {
            let addr = Ipv4Addr::new(x, y, z, i as u8 + 1);
            let node = IsolatedLibvirt::start(&format!("n{i}"), ns, addr)?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    /// The instances, in label order (`n0` first).
    pub fn nodes(&self) -> &[IsolatedLibvirt] {
        &self.nodes
    }

    /// The namespace of node `i`.
    pub fn netns(&self, i: usize) -> Option<&NetNs> {
        self.node_ns.get(i)
    }

    /// A peer URI in the cluster's subnet where nothing listens.
    pub fn unreachable_peer_uri(&self) -> String {
        format!("qemu+tcp://{PAIR_UNREACHABLE}/system")
    }
}

/// Remove what killed test processes left: libvirtd instances whose temp directory names a
/// dead test PID (their qemu processes, the daemon, the directory) and `lvmig-<pid>-*`
/// namespaces of dead PIDs. Instances of live test processes are never touched.
pub fn sweep_stale() {
    let owner_dead = |pid: &str| {
        pid.parse::<u32>()
            .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists())
    };
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let args = cmdline(pid);
            if !args.first().is_some_and(|a| a.ends_with("libvirtd")) {
                continue;
            }
            let Some(pid_file) = args
                .iter()
                .position(|a| a == "--pid-file")
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from)
            else {
                continue;
            };
            let Some(dir) = pid_file.parent() else {
                continue;
            };
            let Some(owner) = dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(DIR_PREFIX))
                .and_then(|n| n.split('-').next())
            else {
                continue;
            };
            if dir.parent() != Some(tmp.as_path()) || !owner_dead(owner) {
                continue;
            }
            let ns = process_netns_inode(pid);
            let qemu: Vec<u32> = pid_files(&dir.join("run").join("qemu"))
                .into_iter()
                .map(|(_, p)| p)
                .collect();
            for q in &qemu {
                if let Some(ns) = ns {
                    kill_qemu(*q, ns);
                }
            }
            // SAFETY: kill(2) of a libvirtd started by a (now dead) test process.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            wait_gone(&[pid], Duration::from_secs(5));
            wait_gone(&qemu, Duration::from_secs(5));
            eprintln!(
                "debvisor-tests: swept stale libvirtd pid={pid} dir={}",
                dir.display()
            );
        }
    }
    // Directories of dead owners whose libvirtd is already gone.
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(owner) = name
                .to_str()
                .and_then(|n| n.strip_prefix(DIR_PREFIX))
                .and_then(|n| n.split('-').next())
            else {
                continue;
            };
            if owner_dead(owner) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(owner) = name
                .strip_prefix(NETNS_PREFIX)
                .and_then(|n| n.strip_prefix('-'))
                .and_then(|n| n.split('-').next())
            else {
                continue;
            };
            if owner_dead(owner) {
                let _ = Command::new("ip").args(["netns", "delete", name]).output();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        assert!(check_label("a").is_ok());
        assert!(check_label("node-2").is_ok());
        for bad in ["", "-a", "A", "a/b", "a b", "abcdefghijklmnopqrstuvwxyz"] {
            assert!(check_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_names_the_address_and_uuid() {
        let addr = Ipv4Addr::new(10, 231, 0, 1);
        let conf = libvirtd_conf(addr, "0a1b2c3d-4e5f-6789-abcd-ef0123456789");
        assert!(conf.contains("listen_addr = \"10.231.0.1\""));
        assert!(conf.contains("host_uuid = \"0a1b2c3d-4e5f-6789-abcd-ef0123456789\""));
        assert!(conf.contains("listen_tcp = 1") && conf.contains("listen_tls = 0"));
        let q = qemu_conf(addr);
        assert!(q.contains("migration_host = \"10.231.0.1\""));
        assert!(q.contains("stdio_handler = \"file\""));
    }

    #[test]
    fn pid_files_are_read_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("vm1.pid"), "123\n").expect("write");
        std::fs::write(dir.path().join("junk.pid"), "x").expect("write");
        std::fs::write(dir.path().join("vm1.xml"), "<x/>").expect("write");
        assert_eq!(pid_files(dir.path()), vec![("vm1".to_string(), 123)]);
        assert!(pid_files(Path::new("/nonexistent")).is_empty());
    }
}
