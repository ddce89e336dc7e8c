//! One daemon per state directory, with real daemons: a second `debvisord` on the state dir
//! of a running one exits 1 at once naming the holder's PID and leaves the first (and its
//! embedded etcd) alone; after the first is SIGKILLed, the next daemon on that state dir
//! adopts the embedded etcd it left running (the lock proves its owner dead).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use debvisor_tests::{free_port, DaemonBuilder, DaemonProcess};

/// Kills (by PID) the embedded etcd a SIGKILLed daemon leaves behind, should the test fail
/// before a daemon stops it; only when the PID still runs etcd on this test's data dir.
struct OrphanGuard {
    pid_file: PathBuf,
    data_dir: PathBuf,
}

impl OrphanGuard {
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for OrphanGuard {
    fn drop(&mut self) {
        let Some(pid) = self.pid() else { return };
        let data_dir = self.data_dir.display().to_string();
        if cmdline(pid).contains(&data_dir) {
            // SAFETY: kill(2) on the PID of the etcd this test had started, checked above.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A standalone node with its embedded etcd on free loopback ports, state in `state`, pid
/// files in `run` (both shared by the daemons of the test, as they are on one host).
fn node(state: &Path, run: &Path, client: u16, peer: u16) -> DaemonBuilder {
    DaemonBuilder::new("locked")
        .state_dir(state)
        .endpoints(&[format!("http://127.0.0.1:{client}")])
        .env("DEBVISOR_PATHS_RUN_DIR", &run.display().to_string())
        .env("DEBVISOR_STORE_EMBEDDED_ENABLED", "true")
        .env("DEBVISOR_STORE_EMBEDDED_CLIENT_PORT", &client.to_string())
        .env("DEBVISOR_STORE_EMBEDDED_PEER_PORT", &peer.to_string())
        .env("DEBVISOR_SERVICES_BACKEND", "process")
}

fn wait_run(d: &mut DaemonProcess) {
    d.wait_run(Duration::from_secs(60))
        .expect("daemon reaches run");
}

#[test]
fn a_second_daemon_on_a_state_dir_is_refused_and_the_next_one_adopts_after_a_crash() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let run = tmp.path().join("run");
    std::fs::create_dir(&state).expect("state dir");
    let (client, peer) = (free_port(), free_port());
    let guard = OrphanGuard {
        pid_file: run.join("etcd.pid"),
        data_dir: state.join("etcd"),
    };

    let mut first = node(&state, &run, client, peer).spawn().expect("spawn");
    wait_run(&mut first);
    let etcd_pid = guard.pid().expect("the embedded etcd's pid file");

    // The second daemon on the same state dir: refused at once, naming the holder.
    let mut second = node(&state, &run, client, peer).spawn().expect("spawn");
    let status = second
        .wait_exit(Duration::from_secs(10))
        .expect("the second daemon exits");
    assert_eq!(status.code(), Some(1), "{}", second.tail(20));
    let (stage, err) = second.failed_stage().expect("a failed stage line");
    assert_eq!(stage, "directories");
    assert!(
        err.contains(&format!(
            "another debvisord (pid {}) is running",
            first.pid()
        )) && err.contains(&state.display().to_string()),
        "{err}"
    );
    // It started nothing: the first daemon and its etcd go on.
    assert!(
        !second
            .lines()
            .iter()
            .any(|l| l.contains("adopting running process")),
        "{}",
        second.tail(20)
    );
    assert!(first.is_running());
    assert_eq!(guard.pid(), Some(etcd_pid));
    assert!(Path::new(&format!("/proc/{etcd_pid}")).exists());
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !first.lines().iter().any(|l| l.contains("lease not found")),
        "{}",
        first.tail(20)
    );

    // The first dies without cleaning up: its etcd keeps running, its lock is gone with it.
    first.kill().expect("SIGKILL");
    assert!(Path::new(&format!("/proc/{etcd_pid}")).exists());
    let mut third = node(&state, &run, client, peer).spawn().expect("spawn");
    wait_run(&mut third);
    let adopted = third
        .wait_for(
            |v| {
                v.get("message").and_then(|m| m.as_str())
                    == Some("adopting running process left by a previous daemon")
            },
            Duration::from_secs(1),
        )
        .expect("the embedded etcd is adopted");
    assert_eq!(
        adopted["pid"].as_u64(),
        Some(u64::from(etcd_pid)),
        "{adopted}"
    );

    // A clean stop ends the adopted etcd too.
    third.signal(libc::SIGTERM).expect("SIGTERM");
    let status = third
        .wait_exit(Duration::from_secs(30))
        .expect("the third daemon exits");
    assert!(status.success(), "{}", third.tail(20));
    let until = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{etcd_pid}")).exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !cmdline(etcd_pid).contains(&state.join("etcd").display().to_string()),
        "the adopted etcd outlived a clean stop"
    );
    drop(guard);
}
