//! Processes of isolated instances: namespace identity, liveness, qemu pid files, and
//! killing only qemu processes that are provably ours.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{IoContext, Result};
use crate::netns::NetNs;

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

pub(super) fn process_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; its state letter is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub(super) fn cmdline(pid: u32) -> Vec<String> {
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
pub(super) fn pid_files(qemu_run_dir: &Path) -> Vec<(String, u32)> {
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
pub(super) fn is_qemu(pid: u32) -> bool {
    cmdline(pid)
        .first()
        .is_some_and(|p| p.contains("qemu-system"))
}

/// SIGKILL `pid` if it is a live qemu process inside network namespace `ns_inode` (so a
/// reused PID or a stale pid file never hits anything else).
pub(super) fn kill_qemu(pid: u32, ns_inode: u64) -> bool {
    if !is_qemu(pid) || process_netns_inode(pid) != Some(ns_inode) || !process_alive(pid) {
        return false;
    }
    // SAFETY: kill(2) of a qemu process started by an instance we own (checked above).
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) == 0 }
}

pub(super) fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
#[cfg(test)]
mod tests {
    use super::*;
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
