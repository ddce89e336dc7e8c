//! A real systemd as PID 1, booted with `systemd-nspawn` from a cached Debian 12 root file
//! system, for the package, unit and Ansible tests (the test machines have no systemd).
//!
//! The root file system is made once with `debootstrap` (with every package the tests need, so
//! a run downloads nothing), kept as a tarball under [`cache_dir`] and extracted once next to
//! it; each container runs on an overlay of that tree with its own throw-away upper layer under
//! `/var/tmp`. Commands run inside through `nsenter -t <leader> -a`. Drop kills the container's
//! PID 1 (which ends its whole PID namespace) and the `systemd-nspawn` process, unmounts the
//! overlay and removes the upper layer.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{HarnessError, IoContext, Result};

/// Packages installed into the root file system at debootstrap time: systemd itself, what
/// `debvisor-daemon` depends on (so `dpkg -i` needs no download), an etcd (server and `etcdctl`), and Python with `apt`
/// bindings for Ansible's `connection: local`.
pub const ROOTFS_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "etcd-server",
    "etcd-client",
    "libvirt0",
    "nftables",
    "iproute2",
    "dnsmasq-base",
    "ipmitool",
    "netbase",
    "python3",
    "python3-apt",
    "procps",
];

/// Debian release of the container.
const SUITE: &str = "bookworm";
/// Mirror debootstrap downloads from.
const MIRROR: &str = "http://deb.debian.org/debian";
/// `PATH` of commands run inside the container.
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Default time limit of one command inside the container.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(300);

/// Where cached test artefacts (root file system tarball, Python venvs) live:
/// `$DEBVISOR_TEST_CACHE` or `/var/cache/debvisor-tests`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("DEBVISOR_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/debvisor-tests"))
}

/// Why a container cannot be booted on this machine (missing tools), if it cannot.
pub fn unavailable_reason() -> Option<String> {
    for tool in ["debootstrap", "systemd-nspawn", "nsenter", "tar"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Some(format!(
                "{tool} is not installed (scripts/deps.sh installs it)"
            ));
        }
    }
    None
}

/// The last `n` lines of `s`.
pub fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run a host command and fail with its output unless it succeeds.
fn host(cmd: &mut Command) -> Result<Output> {
    let command = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("running {command}"))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command,
            status: out.status.to_string(),
            stderr: format!(
                "{}{}",
                last_lines(&String::from_utf8_lossy(&out.stdout), 20),
                last_lines(&String::from_utf8_lossy(&out.stderr), 20)
            ),
        });
    }
    Ok(out)
}

/// The cached root file system tarball, built with debootstrap first if it is missing or was
/// made with another package list (a sidecar `.packages` file records the list).
pub fn ensure_rootfs() -> Result<PathBuf> {
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let dir = cache_dir();
    let tarball = dir.join(format!("rootfs-{SUITE}.tar"));
    let sidecar = dir.join(format!("rootfs-{SUITE}.packages"));
    let wanted = ROOTFS_PACKAGES.join(",");
    if tarball.is_file() && fs::read_to_string(&sidecar).is_ok_and(|s| s.trim() == wanted) {
        return Ok(tarball);
    }
    fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let build = tempfile::Builder::new()
        .prefix("rootfs-build.")
        .tempdir_in(&dir)
        .ctx(|| format!("creating a build directory in {}", dir.display()))?;
    let root = build.path().join("root");
    eprintln!(
        "nspawn: building the {SUITE} root file system (once; cached as {})",
        tarball.display()
    );
    host(Command::new("debootstrap").args([
        "--variant=minbase",
        &format!("--include={wanted}"),
        SUITE,
        &root.to_string_lossy(),
        MIRROR,
    ]))?;
    // Downloaded archives are not needed in the image.
    let archives = root.join("var/cache/apt/archives");
    if let Ok(entries) = fs::read_dir(&archives) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let partial = dir.join(format!("rootfs-{SUITE}.tar.partial"));
    host(Command::new("tar").args([
        "--numeric-owner",
        "-C",
        &root.to_string_lossy(),
        "-cf",
        &partial.to_string_lossy(),
        ".",
    ]))?;
    fs::rename(&partial, &tarball).ctx(|| format!("renaming to {}", tarball.display()))?;
    fs::write(&sidecar, format!("{wanted}\n")).ctx(|| format!("writing {}", sidecar.display()))?;
    Ok(tarball)
}

/// A host directory made visible inside the container.
#[derive(Debug, Clone)]
pub struct Bind {
    /// Directory on the host.
    pub host: PathBuf,
    /// Where it appears in the container.
    pub container: PathBuf,
    /// Read-only inside the container.
    pub read_only: bool,
}

/// One booted container: systemd as PID 1 in its own PID, mount, UTS, IPC and network
/// namespaces (the network namespace has only `lo`, so nothing it does touches the host's
/// network).
pub struct Container {
    name: String,
    dir: Option<tempfile::TempDir>,
    mounted: Option<PathBuf>,
    root: PathBuf,
    console: PathBuf,
    nspawn: Child,
    leader: u32,
}

/// Unmounts an overlay on drop (until the container takes it over).
struct MountGuard(Option<PathBuf>);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = Command::new("umount").arg(&p).stdin(Stdio::null()).output();
        }
    }
}

/// `(ppid, NSpid list)` of a process from `/proc/<pid>/status`.
fn proc_status(pid: u32) -> Option<(u32, Vec<u32>)> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut ppid = None;
    let mut nspid = Vec::new();
    for line in s.lines() {
        if let Some(v) = line.strip_prefix("PPid:") {
            ppid = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("NSpid:") {
            nspid = v
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
        }
    }
    Some((ppid?, nspid))
}

/// The PID (on the host) of the container's PID 1 among the descendants of `nspawn`.
fn find_leader(nspawn: u32) -> Option<u32> {
    let mut procs = Vec::new();
    for e in fs::read_dir("/proc").ok()?.flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
            if let Some((ppid, nspid)) = proc_status(pid) {
                procs.push((pid, ppid, nspid));
            }
        }
    }
    let mut ancestors = vec![nspawn];
    // Descendants, breadth first (the tree below nspawn is a handful of processes).
    let mut i = 0;
    while i < ancestors.len() {
        let parent = ancestors[i];
        for (pid, ppid, nspid) in &procs {
            if *ppid == parent {
                if nspid.len() >= 2 && nspid.last() == Some(&1) {
                    return Some(*pid);
                }
                ancestors.push(*pid);
            }
        }
        i += 1;
    }
    None
}

/// Mount points at or below `dir` in this process's mount namespace.
fn mounts_below(dir: &Path) -> Vec<String> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let prefix = dir.to_string_lossy().into_owned();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .map(str::to_owned)
        .collect()
}

/// The cached root file system extracted once next to its tarball (read-only lower layer of
/// every container); re-extracted when the tarball is newer than the extraction.
fn ensure_base() -> Result<PathBuf> {
    static EXTRACT: Mutex<()> = Mutex::new(());
    let tarball = ensure_rootfs()?;
    let _guard = EXTRACT.lock().unwrap_or_else(|p| p.into_inner());
    let base = cache_dir().join(format!("rootfs-{SUITE}"));
    let stamp = cache_dir().join(format!("rootfs-{SUITE}.extracted"));
    let tar_time = fs::metadata(&tarball)
        .and_then(|m| m.modified())
        .ctx(|| format!("stat {}", tarball.display()))?;
    let fresh = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t >= tar_time);
    if fresh && base.is_dir() {
        return Ok(base);
    }
    let _ = fs::remove_file(&stamp);
    if base.exists() {
        if !mounts_below(&base).is_empty() {
            return Err(HarnessError::State(format!(
                "{} is still mounted somewhere; not replacing it",
                base.display()
            )));
        }
        fs::remove_dir_all(&base).ctx(|| format!("removing {}", base.display()))?;
    }
    fs::create_dir_all(&base).ctx(|| format!("creating {}", base.display()))?;
    host(Command::new("tar").args([
        "--numeric-owner",
        "-C",
        &base.to_string_lossy(),
        "-xf",
        &tarball.to_string_lossy(),
    ]))?;
    fs::write(&stamp, b"").ctx(|| format!("writing {}", stamp.display()))?;
    Ok(base)
}

impl Container {
    /// Boot a container on an overlay of the cached root file system (changes go to a
    /// throw-away upper layer) with `systemd-nspawn`, and wait until systemd reports the boot
    /// finished (`running` or `degraded`).
    pub fn boot(name: &str, binds: &[Bind]) -> Result<Self> {
        Container::boot_on(name, binds, None)
    }

    /// [`Container::boot`] with the container's network on host bridge `bridge`
    /// (`--network-bridge`: its veth `host0` is enslaved there; the caller configures the
    /// address inside) instead of a private network with loopback only.
    pub fn boot_on(name: &str, binds: &[Bind], bridge: Option<&str>) -> Result<Self> {
        let base = ensure_base()?;
        let dir = tempfile::Builder::new()
            .prefix("debvisor-nspawn.")
            .tempdir_in("/var/tmp")
            .ctx(|| "creating a container directory in /var/tmp".to_string())?;
        let root = dir.path().join("root");
        let upper = dir.path().join("upper");
        let work = dir.path().join("work");
        for d in [&root, &upper, &work] {
            fs::create_dir(d).ctx(|| format!("creating {}", d.display()))?;
        }
        host(Command::new("mount").args([
            "-t",
            "overlay",
            "overlay",
            "-o",
            &format!(
                "lowerdir={},upperdir={},workdir={}",
                base.display(),
                upper.display(),
                work.display()
            ),
            &root.to_string_lossy(),
        ]))?;
        // From here on, Drop unmounts the overlay.
        let mut mounted = MountGuard(Some(root.clone()));
        // etcd resolves `localhost`; debootstrap leaves no /etc/hosts.
        fs::write(
            root.join("etc/hosts"),
            format!("127.0.0.1 localhost\n::1 localhost ip6-localhost\n127.0.1.1 {name}\n"),
        )
        .ctx(|| "writing /etc/hosts of the container".to_string())?;
        let console = dir.path().join("console.log");
        let log = fs::File::create(&console).ctx(|| format!("creating {}", console.display()))?;
        let log2 = log
            .try_clone()
            .ctx(|| format!("duplicating {}", console.display()))?;
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args([
            "--quiet",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            "--machine",
            name,
            "--directory",
        ])
        .arg(&root);
        match bridge {
            Some(br) => cmd.arg(format!("--network-bridge={br}")),
            None => cmd.arg("--private-network"),
        };
        for b in binds {
            let flag = if b.read_only { "--bind-ro" } else { "--bind" };
            cmd.arg(format!(
                "{flag}={}:{}",
                b.host.display(),
                b.container.display()
            ));
        }
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .ctx(|| "spawning systemd-nspawn".to_string())?;
        let mut c = Container {
            name: name.to_owned(),
            dir: Some(dir),
            mounted: mounted.0.take(),
            root,
            console,
            nspawn,
            leader: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(pid) = find_leader(c.nspawn.id()) {
                c.leader = pid;
                break;
            }
            if let Ok(Some(status)) = c.nspawn.try_wait() {
                return Err(HarnessError::Exited {
                    what: format!("container {name} to start"),
                    status: status.to_string(),
                    tail: c.console_tail(),
                });
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    what: format!("the PID 1 of container {name}"),
                    timeout: Duration::from_secs(60),
                    tail: c.console_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // `is-system-running --wait` needs the system bus socket of PID 1; retry until
        // systemd answers, then it waits for the boot to finish itself.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = c.exec_with(
                &["systemctl", "is-system-running", "--wait"],
                Duration::from_secs(120),
            )?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            match state.as_str() {
                "running" => return Ok(c),
                "degraded" => {
                    let failed = c.exec(&["systemctl", "--failed", "--no-legend"])?;
                    eprintln!(
                        "nspawn: {name} booted degraded: {}",
                        String::from_utf8_lossy(&failed.stdout).trim()
                    );
                    return Ok(c);
                }
                _ if Instant::now() > deadline => {
                    return Err(HarnessError::Timeout {
                        what: format!("systemd in {name} to finish booting (last: {state:?})"),
                        timeout: Duration::from_secs(120),
                        tail: c.console_tail(),
                    })
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The machine name given at boot.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host PID of the container's PID 1 (systemd).
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// The host path of `path` inside the container (to place or read files directly).
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Write a file inside the container (parents created), mode 0644.
    pub fn write_file(&self, path: &str, contents: &str) -> Result<()> {
        let p = self.host_path(path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        let mut f = fs::File::create(&p).ctx(|| format!("creating {}", p.display()))?;
        f.write_all(contents.as_bytes())
            .ctx(|| format!("writing {}", p.display()))
    }

    /// The last lines of the container's console (boot messages of systemd).
    pub fn console_tail(&self) -> String {
        last_lines(&fs::read_to_string(&self.console).unwrap_or_default(), 40)
    }

    /// Run `args` inside the container (all its namespaces, a clean environment) with a time
    /// limit; returns its output whatever the exit status.
    pub fn exec_with(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let secs = timeout.as_secs().max(1).to_string();
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.leader.to_string(), "-a", "--wdns=/", "--"])
            .args(["/usr/bin/env", "-i"])
            .arg(format!("PATH={CONTAINER_PATH}"))
            .args(["LANG=C.UTF-8", "HOME=/root", "TERM=dumb", "SYSTEMD_PAGER="])
            .args(["timeout", "--kill-after=5", &secs])
            .args(args)
            .stdin(Stdio::null());
        cmd.output()
            .ctx(|| format!("running {} in container {}", args.join(" "), self.name))
    }

    /// [`Container::exec_with`] with [`EXEC_TIMEOUT`].
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        self.exec_with(args, EXEC_TIMEOUT)
    }

    /// Run `args` inside the container; its stdout, or an error with its output unless it
    /// exits 0.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.exec(args)?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: format!("{} (in container {})", args.join(" "), self.name),
                status: out.status.to_string(),
                stderr: format!(
                    "{}\n{}",
                    last_lines(&String::from_utf8_lossy(&out.stdout), 40),
                    last_lines(&String::from_utf8_lossy(&out.stderr), 40)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGKILL to PID 1 of a PID namespace ends every process in it.
        if self.leader > 0 {
            // SAFETY: kill(2) on a PID this container started; no memory involved.
            unsafe {
                libc::kill(self.leader as libc::pid_t, libc::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.nspawn.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.nspawn.kill();
                    let _ = self.nspawn.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        if let Some(root) = self.mounted.take() {
            drop(MountGuard(Some(root)));
        }
        // nspawn leaves an empty propagation directory per machine name behind.
        let _ = fs::remove_dir(format!("/run/systemd/nspawn/propagate/{}", self.name));
        // The container's own mounts live in its mount namespace and are gone with it; should
        // one still be visible here, never delete through it.
        if let Some(dir) = self.dir.take() {
            let left = mounts_below(dir.path());
            if left.is_empty() {
                drop(dir);
            } else {
                let kept = dir.keep();
                eprintln!(
                    "nspawn: {} left mounts {left:?}; not removing {}",
                    self.name,
                    kept.display()
                );
            }
        }
    }
}
