//! Leftovers of test processes that were killed before their guards ran.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::procs::{cmdline, kill_qemu, pid_files, process_netns_inode, wait_gone};
use super::{DIR_PREFIX, NETNS_PREFIX};

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
