//! libvirt for tests: make sure the system libvirtd answers, tiny guests that boot in well
//! under a second, and a guard that removes a test domain even when the test panics.
//!
//! libvirtd and virtlogd are system services: the harness starts them (`-d`) when their
//! sockets do not answer and leaves them running; it never stops or kills a daemon.
//! Test domains are named `dvtest-<pid>-<n>-<label>` so [`sweep_stale`] can remove those
//! left behind by a test process that was killed.

use std::fs::OpenOptions;
use std::os::unix::net::UnixStream;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use debvisor_daemon::hypervisor::{DomainEvent, Libvirt, Lifecycle};
use tokio::sync::mpsc;

use crate::error::{HarnessError, IoContext, Result};

/// The system QEMU driver (real guests).
pub const QEMU_URI: &str = "qemu:///system";
/// libvirt's in-process test driver.
pub const TEST_URI: &str = "test:///default";
/// Prefix of every domain a test creates.
pub const NAME_PREFIX: &str = "dvtest-";

const LIBVIRT_SOCK: &str = "/run/libvirt/libvirt-sock";
const VIRTLOGD_SOCK: &str = "/run/libvirt/virtlogd-sock";
/// Cross-process lock so parallel test binaries do not start two daemons.
const START_LOCK: &str = "/run/lock/debvisor-test-libvirtd.lock";

/// Whether qemu guests can use KVM: `/dev/kvm` is read-write for libvirt's unprivileged
/// qemu user (for everyone, or for the `kvm` group that user is in). Root opening it is not
/// enough: a `crw------- root` node (no udev rule applied) makes a `type='kvm'` guest fail.
/// Without it guests run under TCG.
pub fn kvm_available() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata("/dev/kvm") else {
        return false;
    };
    let mode = m.mode();
    if mode & 0o006 == 0o006 {
        return true;
    }
    let kvm_gid = std::fs::read_to_string("/etc/group").ok().and_then(|g| {
        g.lines()
            .find_map(|l| l.strip_prefix("kvm:"))
            .and_then(|rest| rest.split(':').nth(1)?.parse::<u32>().ok())
    });
    mode & 0o060 == 0o060 && kvm_gid == Some(m.gid())
}

/// Start of every test with real guests: without a usable `/dev/kvm` ([`kvm_available`]) its
/// guests would silently run under TCG, which is a skip of the KVM part
/// ([`crate::skip::skip_or_fail`], a failure under `DEBVISOR_REQUIRE_ALL=1`). Returns whether
/// KVM is usable; when it is not and that is allowed, the test goes on under TCG.
#[track_caller]
pub fn require_kvm() -> bool {
    let kvm = kvm_available();
    if !kvm {
        crate::skip::skip_or_fail(
            "no usable /dev/kvm (read-write for libvirt's qemu user): guests run under TCG",
            crate::skip::SkipKind::Environment,
        );
    }
    kvm
}

/// Whether qemu process `pid` runs its guest with KVM: it holds KVM vCPU descriptors
/// (`/proc/<pid>/fd/*` → `anon_inode:kvm-vcpu:<n>`), which a TCG guest never has. The live
/// process is asked, not the XML, so a qemu that fell back to TCG cannot pass.
pub fn qemu_uses_kvm(pid: u32) -> Result<bool> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).ctx(|| format!("listing {dir}"))?;
    Ok(entries.flatten().any(|e| {
        std::fs::read_link(e.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("anon_inode:kvm-vcpu"))
    }))
}

/// Check that the started guest run by qemu process `pid` executes with KVM, not a silent
/// TCG fallback. Without a usable `/dev/kvm` the check cannot hold: that is a skip through
/// [`require_kvm`] (a failure under `DEBVISOR_REQUIRE_ALL=1`).
///
/// # Panics
/// When KVM is usable but the guest does not use it, or its descriptors cannot be read.
#[track_caller]
pub fn assert_guest_uses_kvm(pid: u32) {
    if !require_kvm() {
        return;
    }
    match qemu_uses_kvm(pid) {
        Ok(true) => {}
        Ok(false) => panic!(
            "qemu {pid} runs its guest without KVM (no kvm-vcpu descriptor): a TCG fallback \
             although /dev/kvm is usable; cmdline: {}",
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default()
        ),
        Err(e) => panic!("checking qemu {pid} for KVM: {e}"),
    }
}

fn socket_answers(path: &str) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Run `cmd` to completion within `timeout`; a command still running then is killed (it
/// is our child). Output goes through temp files, not pipes, so a daemon that forks into
/// the background cannot keep us waiting for EOF.
pub(crate) fn run_bounded(cmd: &mut Command, what: &str, timeout: Duration) -> Result<Output> {
    use std::io::{Read, Seek};
    let files = (tempfile::tempfile(), tempfile::tempfile());
    let (Ok(out_file), Ok(err_file)) = files else {
        return Err(HarnessError::State(format!("no temp files for `{what}`")));
    };
    let mut out_read = out_file
        .try_clone()
        .ctx(|| format!("temp file for {what}"))?;
    let mut err_read = err_file
        .try_clone()
        .ctx(|| format!("temp file for {what}"))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_file))
        .stderr(Stdio::from(err_file))
        .spawn()
        .ctx(|| format!("running `{what}`"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().ctx(|| format!("waiting for `{what}`"))? {
            let mut out = Output {
                status,
                stdout: Vec::new(),
                stderr: Vec::new(),
            };
            let _ = out_read.rewind();
            let _ = out_read.read_to_end(&mut out.stdout);
            let _ = err_read.rewind();
            let _ = err_read.read_to_end(&mut out.stderr);
            return Ok(out);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HarnessError::Timeout {
                what: format!("`{what}` to finish"),
                timeout,
                tail: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_daemon(bin: &str, socket: &str) -> Result<()> {
    let out = run_bounded(
        Command::new(bin).arg("-d"),
        &format!("{bin} -d"),
        Duration::from_secs(20),
    )?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command: format!("{bin} -d"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket_answers(socket) {
        if Instant::now() >= deadline {
            return Err(HarnessError::Timeout {
                what: format!("{bin} to listen on {socket}"),
                timeout: Duration::from_secs(10),
                tail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Make sure `virtlogd` and `libvirtd` run (start them with `-d` when their sockets do not
/// answer) and that `virsh -c qemu:///system version` answers, within 120 s.
pub fn ensure_libvirtd() -> Result<()> {
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    let _guard = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(START_LOCK)
        .ctx(|| format!("opening {START_LOCK}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a file we hold open; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(HarnessError::Io {
            context: format!("locking {START_LOCK}"),
            source: std::io::Error::last_os_error(),
        });
    }
    if !socket_answers(VIRTLOGD_SOCK) {
        start_daemon("virtlogd", VIRTLOGD_SOCK)?;
    }
    if !socket_answers(LIBVIRT_SOCK) {
        start_daemon("libvirtd", LIBVIRT_SOCK)?;
    }
    // libvirtd re-probing qemu's capabilities answers `version` only after that (≈40 s seen
    // on a loaded 2-core machine): generous deadlines, not speed claims.
    let timeout = Duration::from_secs(120);
    let deadline = Instant::now() + timeout;
    loop {
        let last = match run_bounded(
            Command::new("virsh").args(["-c", QEMU_URI, "version"]),
            "virsh version",
            Duration::from_secs(60),
        ) {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(HarnessError::Timeout {
                what: format!("`virsh -c {QEMU_URI} version` to answer"),
                timeout,
                tail: last,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A fresh random UUID, canonical lower case (from the kernel; a time-based one if
/// `/proc/sys/kernel/random/uuid` cannot be read).
pub fn random_uuid() -> String {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/uuid") {
        return s.trim().to_ascii_lowercase();
    }
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst) as u64 & 0xfff;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{:08x}-{:04x}-4{n:03x}-8000-{:012x}",
        std::process::id(),
        t & 0xffff,
        (t >> 16) & 0xffff_ffff_ffff
    )
}

/// A unique test domain name: `dvtest-<pid>-<n>-<label>` (label cut to keep ≤ 64 chars).
pub fn unique_name(label: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let label: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(32)
        .collect();
    format!("{NAME_PREFIX}{}-{n}-{label}", std::process::id())
}

/// A diskless, NIC-less guest that only reaches its firmware (SeaBIOS finds nothing to boot
/// and waits): 64 MiB, 1 vCPU, ACPI present but unanswered, so it ignores ACPI shutdown.
/// `type='kvm'` when [`kvm_available`], else `type='qemu'` (TCG; tests with guests call
/// [`require_kvm`] and [`assert_guest_uses_kvm`], so CI cannot fall back to it unnoticed).
pub fn tiny_guest_xml(name: &str, uuid: &str) -> String {
    let kind = if kvm_available() { "kvm" } else { "qemu" };
    format!(
        "<domain type='{kind}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <currentMemory unit='MiB'>64</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='network'/>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <memballoon model='none'/>
  </devices>
</domain>
"
    )
}

/// The same guest for libvirt's test driver (`type='test'`).
pub fn test_driver_xml(name: &str, uuid: &str) -> String {
    format!(
        "<domain type='test'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <currentMemory unit='MiB'>64</currentMemory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
</domain>
"
    )
}

/// A test domain's identity, destroyed and undefined (by UUID) on drop, also when the test
/// panics. Creating the guard defines nothing: the test does that through the API it tests.
pub struct TestDomain {
    lv: Libvirt,
    /// Its UUID.
    pub uuid: String,
    /// Its name (`dvtest-…`).
    pub name: String,
}

impl TestDomain {
    /// A new identity on `lv`'s host.
    pub fn new(lv: &Libvirt, label: &str) -> TestDomain {
        TestDomain {
            lv: lv.clone(),
            uuid: random_uuid(),
            name: unique_name(label),
        }
    }

    /// The tiny guest XML for this domain, for the driver behind `lv`.
    pub fn xml(&self) -> String {
        if self.lv.uri().starts_with("test:") {
            test_driver_xml(&self.name, &self.uuid)
        } else {
            tiny_guest_xml(&self.name, &self.uuid)
        }
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        let lv = self.lv.clone();
        let uuid = self.uuid.clone();
        // Drop may run inside a tokio runtime: use a thread with its own runtime.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                lv.destroy(&uuid).await.map_err(|e| e.to_string())?;
                lv.undefine(&uuid).await.map_err(|e| e.to_string())?;
                Ok::<(), String>(())
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!(
                "TestDomain {} ({}): cleanup failed: {e}",
                self.name, self.uuid
            ),
            Err(_) => eprintln!("TestDomain {} ({}): cleanup panicked", self.name, self.uuid),
        }
    }
}

/// The system libvirtd (`qemu:///system`, started by [`ensure_libvirtd`] if needed) with
/// stale test guests swept, and a 2-worker runtime to drive it from a synchronous test.
pub fn system_libvirt() -> Result<(tokio::runtime::Runtime, Libvirt)> {
    ensure_libvirtd()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .ctx(|| "building a tokio runtime".to_owned())?;
    let lv = Libvirt::new(QEMU_URI, Duration::from_secs(20));
    rt.block_on(sweep_stale(&lv));
    Ok((rt, lv))
}

/// Remove `dvtest-<pid>-…` domains whose test process is gone (left by a killed run).
pub async fn sweep_stale(lv: &Libvirt) {
    let Ok(domains) = lv.list().await else {
        return;
    };
    for d in domains {
        let Some(rest) = d.name.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = lv.destroy(&d.uuid).await;
        let _ = lv.undefine(&d.uuid).await;
    }
}

/// Wait until a lifecycle event of `uuid` satisfying `want` arrives; fails after `timeout`
/// listing what did arrive for that domain.
pub async fn wait_event(
    rx: &mut mpsc::Receiver<DomainEvent>,
    uuid: &str,
    timeout: Duration,
    want: impl Fn(&Lifecycle) -> bool,
) -> Result<Lifecycle> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(DomainEvent::Lifecycle { uuid: u, event, .. })) if u == uuid => {
                if want(&event) {
                    return Ok(event);
                }
                seen.push(format!("{event:?}"));
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(HarnessError::State("event subscription ended".into()));
            }
            Err(_) => {
                return Err(HarnessError::Timeout {
                    what: format!("a lifecycle event of {uuid}"),
                    timeout,
                    tail: seen.join("\n"),
                })
            }
        }
    }
}
