//! Throw-away network namespaces (`ip netns`), and root detection for tests needing them.
//!
//! Every namespace the harness creates is named `<prefix>-<creator pid>-<n>.dvtest`: the
//! suffix marks it as the harness's, the PID names the test process that owns it. A test
//! process killed before its guards ran leaves its namespaces behind; the first
//! [`NetNs::create`] of every test process removes those whose creator is dead
//! ([`sweep_stale`]), never one of a live run.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use crate::error::{HarnessError, IoContext, Result};

/// Whether the test process runs as root (effective UID 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Run `ip args…` and fail with its stderr unless it succeeds.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
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

/// Suffix of every namespace name the harness creates (see the module documentation).
pub const NAME_SUFFIX: &str = ".dvtest";

/// The PID of the test process that created namespace `name`, if `name` is one of the
/// harness's (`<prefix>-<pid>-<n>.dvtest`).
pub fn creator_pid(name: &str) -> Option<u32> {
    let rest = name.strip_suffix(NAME_SUFFIX)?;
    let mut parts = rest.rsplitn(3, '-');
    let n = parts.next()?;
    let pid = parts.next()?;
    let prefix = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if prefix.is_empty() || !digits(n) || !digits(pid) {
        return None;
    }
    pid.parse().ok()
}

/// Kill (by PID) whatever runs inside namespace `name`, then delete it. Errors are printed,
/// not returned: used by drop and by the sweep, which both carry on.
fn kill_inside_and_delete(name: &str) {
    // Whatever still runs inside a namespace the harness created was started by the test
    // (or by a daemon the test started, e.g. its dnsmasq): end it by PID before deleting.
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) of a process inside a namespace the harness created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    if let Err(e) = ip(&["netns", "delete", name]) {
        eprintln!("debvisor-tests: deleting netns {name}: {e}");
    }
}

/// Delete the harness's namespaces (`…-<pid>-<n>.dvtest`) whose creating process no longer
/// exists: left by a test process killed before its guards ran. A namespace of a live
/// process (also one whose PID was reused) is kept. Returns the names deleted.
pub fn sweep_stale() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    let mut swept = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `name` or `name (id: N)`.
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = creator_pid(name) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_inside_and_delete(name);
        eprintln!("debvisor-tests: swept netns {name} of dead test process {pid}");
        swept.push(name.to_owned());
    }
    swept
}

/// A network namespace named `<prefix>-<pid>-<n>.dvtest` with `lo` up; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Create a fresh namespace (`ip netns add`) and bring its loopback up.
    /// The first call of a test process first removes namespaces of dead test processes
    /// ([`sweep_stale`]).
    pub fn create(prefix: &str) -> Result<NetNs> {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| {
            sweep_stale();
        });
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{prefix}-{}-{n}{NAME_SUFFIX}", std::process::id());
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
        kill_inside_and_delete(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_harness_names_have_a_creator() {
        assert_eq!(creator_pid("fwnode-1234-0.dvtest"), Some(1234));
        assert_eq!(creator_pid("dv-node-a-99-12.dvtest"), Some(99));
        for other in [
            "fwnode-1234-0",
            "1234-0.dvtest",
            "fwnode-x-0.dvtest",
            "fwnode-1234-.dvtest",
            "fwnode--0.dvtest",
            "cni-1234-5",
            "",
        ] {
            assert_eq!(creator_pid(other), None, "{other:?}");
        }
    }
}
