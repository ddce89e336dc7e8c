//! Leftovers of killed test runs: Ceph daemons and directories of test processes that died
//! before their [`super::CephCluster`] guard ran.

use std::path::Path;
use std::time::{Duration, Instant};

use super::DIR_PREFIX;

/// The owner PID in a cluster directory name `debvisor-ceph-<pid>-…`.
fn owner_of(dir_name: &str) -> Option<u32> {
    dir_name
        .strip_prefix(DIR_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
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

/// Kill `ceph-mon`/`ceph-mgr`/`ceph-osd` processes whose `-c` config lies in a cluster
/// directory of a dead test process, then remove such directories. Clusters of live test
/// processes are never touched.
pub fn sweep_stale() {
    let tmp = std::env::temp_dir();
    let stale_dir = |conf: &Path| -> bool {
        let Some(dir) = conf.parent() else {
            return false;
        };
        dir.parent() == Some(tmp.as_path())
            && dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(owner_of)
                .is_some_and(|owner| !pid_alive(owner))
    };
    let mut killed = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let args = cmdline(pid);
            let is_daemon = args.first().is_some_and(|a| {
                ["ceph-mon", "ceph-mgr", "ceph-osd"]
                    .iter()
                    .any(|d| a.ends_with(d))
            });
            let conf = args
                .iter()
                .position(|a| a == "-c")
                .and_then(|i| args.get(i + 1));
            if !is_daemon || !conf.is_some_and(|c| stale_dir(Path::new(c))) {
                continue;
            }
            // SAFETY: kill(2) of a Ceph daemon started by a (now dead) test process.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGCONT);
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            eprintln!("debvisor-tests: swept stale ceph daemon pid={pid} args={args:?}");
            killed.push(pid);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while killed.iter().any(|p| pid_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name();
            if name
                .to_str()
                .and_then(owner_of)
                .is_some_and(|owner| !pid_alive(owner))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_is_read_from_the_directory_name() {
        assert_eq!(owner_of("debvisor-ceph-1234-abXY"), Some(1234));
        assert_eq!(owner_of("debvisor-ceph-x-ab"), None);
        assert_eq!(owner_of("debvisor-etcd-1234-ab"), None);
    }
}
