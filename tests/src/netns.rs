//! Throw-away network namespaces (`ip netns`), and root detection for tests needing them.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{HarnessError, IoContext, Result};

/// Whether the test process runs as root (effective UID 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Run `ip args…` and fail with its stderr unless it succeeds.
fn ip(args: &[&str]) -> Result<()> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .ctx(|| format!("running `{command}`"))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Move the calling thread into network namespace `name` (`/run/netns/<name>`). Sockets the
/// thread opens afterwards live there; use it on a thread of its own.
pub fn enter_thread(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{name}");
    let f = std::fs::File::open(&path).ctx(|| format!("opening {path}"))?;
    // SAFETY: setns(2) on a namespace fd we just opened; affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(HarnessError::Io {
            context: format!("setns into {path}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A network namespace named `<prefix>-<pid>-<n>` with `lo` up; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Create a fresh namespace (`ip netns add`) and bring its loopback up.
    pub fn create(prefix: &str) -> Result<NetNs> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace name (as used by `ip netns` / `/run/netns/<name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Run `f` on a fresh thread inside this namespace and return its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|s| {
            let h = s.spawn(|| -> Result<T> {
                enter_thread(&self.name)?;
                Ok(f())
            });
            match h.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// Run `ip -n NAME args…` (setup helpers of tests), failing with its stderr.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// A command running `program args…` inside the namespace (`ip netns exec NAME …`).
    pub fn exec_cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Whatever still runs inside a namespace we created was started by the test (or by a
        // daemon the test started, e.g. its dnsmasq): end it by PID before deleting.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a process inside our own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("debvisor-tests: deleting netns {}: {e}", self.name);
        }
    }
}
