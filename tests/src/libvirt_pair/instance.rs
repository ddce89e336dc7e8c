//! One isolated libvirtd: spawned into its namespaces, awaited, torn down.

use std::ffi::CString;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use debvisor_daemon::hypervisor::Libvirt;

use super::config::{seed_capabilities_cache, write_config};
use super::procs::{is_qemu, kill_qemu, pid_files, process_alive, wait_gone};
use super::{DESTROY_TIMEOUT, DIR_PREFIX, LIBVIRT_TCP_PORT, PRIVATE_DIRS, START_TIMEOUT};
use crate::error::{file_tail, HarnessError, IoContext, Result};
use crate::libvirt::{random_uuid, run_bounded};
use crate::netns::{enter_thread, NetNs};

/// Lock `m`, also when a panicking thread poisoned it (teardown must still happen).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A libvirtd in its own network, mount and UTS namespaces; everything is torn down on drop.
#[derive(Debug)]
pub struct IsolatedLibvirt {
    label: String,
    hostname: String,
    host_uuid: String,
    addr: Ipv4Addr,
    netns_inode: u64,
    /// Name of the network namespace it runs in (given to `start`).
    netns: String,
    root: Option<tempfile::TempDir>,
    /// libvirtd while it runs (behind a lock: a node's BMC restarts it through `&self`).
    child: Mutex<Option<Child>>,
    pid: AtomicU32,
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
        for (name, _) in PRIVATE_DIRS {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        write_config(&root.path().join("etc"), addr, &host_uuid)?;
        seed_capabilities_cache(&root.path().join("cache"))?;
        let ns_path = format!("/run/netns/{}", ns.name());
        let netns_inode = std::fs::metadata(&ns_path)
            .ctx(|| format!("stat {ns_path}"))?
            .ino();
        let inst = IsolatedLibvirt {
            label: label.to_string(),
            hostname: format!("dvlv-{label}"),
            host_uuid,
            addr,
            netns_inode,
            netns: ns.name().to_string(),
            root: Some(root),
            child: Mutex::new(None),
            pid: AtomicU32::new(0),
        };
        inst.spawn()?;
        inst.wait_ready()?;
        eprintln!(
            "debvisor-tests: libvirtd instance={} pid={} netns={} addr={addr} started",
            inst.label,
            inst.libvirtd_pid(),
            ns.name()
        );
        Ok(inst)
    }

    /// Spawn libvirtd (foreground, its own process group) inside the instance's network
    /// namespace and fresh mount + UTS namespaces with the private directories bound over
    /// the system ones. Its output is appended to `libvirtd.log`.
    fn spawn(&self) -> Result<()> {
        let root = self.root().to_path_buf();
        let mut binds = Vec::new();
        for (name, target) in PRIVATE_DIRS {
            binds.push((path_c_string(&root.join(name))?, c_string(target)?));
        }
        let ns_path = format!("/run/netns/{}", self.netns);
        let ns_file = File::open(&ns_path).ctx(|| format!("opening {ns_path}"))?;
        let log_path = root.join("libvirtd.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .ctx(|| format!("opening {}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .ctx(|| format!("cloning {}", log_path.display()))?;
        let mut cmd = Command::new("libvirtd");
        cmd.arg("--listen")
            .arg("--pid-file")
            .arg(root.join("libvirtd.pid"))
            .env_remove("LIBVIRT_DEFAULT_URI")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0);
        let ns_fd = ns_file.as_raw_fd();
        let slash = c_string("/")?;
        let host_c = c_string(&self.hostname)?;
        let host_len = self.hostname.len();
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
            .ctx(|| format!("starting libvirtd {} in netns {}", self.label, self.netns))?;
        drop(ns_file);
        self.pid.store(child.id(), Ordering::SeqCst);
        *lock(&self.child) = Some(child);
        Ok(())
    }

    /// Whether libvirtd runs (reaps it if it exited).
    pub fn is_running(&self) -> bool {
        matches!(
            lock(&self.child).as_mut().map(Child::try_wait),
            Some(Ok(None))
        )
    }

    /// Reap libvirtd if it exited (e.g. killed with its node by a power off); true if it no
    /// longer runs.
    pub fn reap(&self) -> bool {
        let mut child = lock(&self.child);
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => false,
            Some(_) => {
                *child = None;
                true
            }
            None => true,
        }
    }

    /// Start libvirtd again after it died, on the same directories, configuration, address
    /// and `host_uuid` (a node powered on again, a crashed libvirtd restarted), and wait
    /// until it answers. When no qemu process of the instance runs any more, its
    /// `/run/libvirt` is emptied first, as a reboot empties a tmpfs; otherwise it is kept
    /// and libvirtd reconnects to the running guests. Persistent definitions stay.
    ///
    /// Fails if libvirtd still runs.
    pub fn restart(&self) -> Result<()> {
        self.respawn()?;
        self.wait_ready()
    }

    /// The first half of [`IsolatedLibvirt::restart`]: spawn without waiting (a caller that
    /// must not hold a lock while libvirtd starts up waits with `wait_ready`).
    pub(crate) fn respawn(&self) -> Result<()> {
        if !self.reap() {
            return Err(HarnessError::State(format!(
                "libvirtd {} still runs (pid {})",
                self.label,
                self.libvirtd_pid()
            )));
        }
        if self.qemu_pids().is_empty() {
            let run = self.run_dir();
            let entries = std::fs::read_dir(&run).ctx(|| format!("listing {}", run.display()))?;
            for e in entries.flatten() {
                let p = e.path();
                let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                r.ctx(|| format!("removing {}", p.display()))?;
            }
        }
        self.spawn()
    }

    /// Wait until libvirtd answers `virsh version` on its socket and accepts TCP at its
    /// address (from inside its namespace); fail early with its log if it exits.
    pub(crate) fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let sock = self.socket_path();
        let uri = self.local_uri();
        let tcp = SocketAddr::from((self.addr, LIBVIRT_TCP_PORT));
        let mut last = String::new();
        loop {
            let exited = match lock(&self.child).as_mut() {
                Some(child) => child
                    .try_wait()
                    .ctx(|| format!("waiting for libvirtd {}", self.label))?,
                None => {
                    return Err(HarnessError::State(format!(
                        "libvirtd {} was reaped",
                        self.label
                    )))
                }
            };
            if let Some(status) = exited {
                *lock(&self.child) = None;
                return Err(HarnessError::Exited {
                    what: format!("libvirtd {} to answer", self.label),
                    status: status.to_string(),
                    tail: self.log_tail(30),
                });
            }
            if UnixStream::connect(&sock).is_ok() {
                match run_bounded(
                    Command::new("virsh").args(["-c", &uri, "version"]),
                    "virsh version",
                    Duration::from_secs(10),
                ) {
                    Ok(out) if out.status.success() => match self.tcp_answers(tcp) {
                        Ok(()) => return Ok(()),
                        Err(e) => last = format!("TCP {tcp}: {e}"),
                    },
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

    /// Whether `tcp` accepts a connection from inside the instance's network namespace.
    fn tcp_answers(&self, tcp: SocketAddr) -> Result<()> {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_thread(&self.netns)?;
                TcpStream::connect_timeout(&tcp, Duration::from_secs(1))
                    .map(drop)
                    .ctx(|| format!("connecting to {tcp}"))
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
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
        self.pid.load(Ordering::SeqCst)
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

    /// The inode of its network namespace (compare with [`process_netns_inode`](super::process_netns_inode)).
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
        let pid = self.libvirtd_pid();
        let slot = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let Some(mut child) = slot.take() else {
            return Ok(());
        };
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(());
        }
        // SAFETY: kill(2) of our own child, which has not been reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
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
                        .map_err(|e| format!("reaping libvirtd {pid}: {e}"));
                }
            }
        }
    }
}

impl Drop for IsolatedLibvirt {
    fn drop(&mut self) {
        let mut errors = Vec::new();
        let before: Vec<u32> = self.qemu_pids().into_iter().map(|(_, p)| p).collect();
        if self.is_running() {
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
}
