//! Coordinator services: a small service-manager abstraction with a `systemd` backend
//! (`systemctl`, when PID 1 is systemd) and a `process` backend that spawns and supervises
//! the program itself (the embedded etcd of a standalone node, and hosts without systemd).
//!
//! The process backend only ever signals PIDs it started (or adopted from its own pid file),
//! never by name. It adopts only with proof: the daemon that wrote the pid file is dead (this
//! one holds the state-dir lock, [`crate::statelock`]) and the process runs the same binary
//! with the same arguments.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Errors of the service manager.
#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("service {service}: cannot start {program}: {source}")]
    Spawn {
        service: String,
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("service {service}: {command} failed: {message}")]
    Command {
        service: String,
        command: String,
        message: String,
    },
    #[error("service {service}: {command} did not finish within {timeout:?}")]
    Timeout {
        service: String,
        command: String,
        timeout: Duration,
    },
    #[error("service {service}: {message}")]
    Io { service: String, message: String },
}

/// A program the process backend runs.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Service name for logs and the pid file.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// stdout+stderr of the program go here.
    pub log_file: PathBuf,
    /// `<run_dir>/<name>.pid`, used to adopt a copy left running by a previous daemon.
    pub pid_file: PathBuf,
}

/// PIDs of programs this process started, for the emergency exit (second SIGTERM).
static OWNED_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn owned() -> std::sync::MutexGuard<'static, Vec<u32>> {
    OWNED_PIDS.lock().unwrap_or_else(|p| p.into_inner())
}

/// SIGTERM every program we started; used when exiting at once.
pub fn terminate_owned_now() {
    for pid in owned().iter() {
        // SAFETY: plain kill(2) on a PID we spawned.
        unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
    }
}

/// Does `pid` run (not a zombie)?
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
                    .unwrap_or(false)
            })
            .unwrap_or(false)
}

/// The command line of `pid` (empty when it is gone).
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A supervised program: restarted with backoff when it exits unexpectedly.
pub struct Supervised {
    name: String,
    /// The process was left running by a previous daemon and adopted, not spawned.
    adopted: bool,
    pid: Arc<Mutex<Option<u32>>>,
    cancel: CancellationToken,
    done: tokio::sync::watch::Receiver<bool>,
}

impl Supervised {
    /// Start `spec` (or adopt the copy recorded in its pid file whose command line matches).
    pub async fn start(spec: ProcessSpec) -> Result<Supervised, ServiceError> {
        let first = match adoptable(&spec) {
            Some(p) => {
                info!(service = %spec.name, pid = p, "adopting running process left by a previous daemon");
                Child::Adopted(p)
            }
            None => spawn(&spec).await?,
        };
        Ok(Supervised::supervise_from(spec, first))
    }

    /// Adopt the copy of `spec` a previous daemon left running (its pid file names a live
    /// process with `spec`'s command line), never spawning one: `None` when there is none.
    /// Used to take back a process the daemon will not (re)configure, so that it is stopped
    /// with the daemon instead of left behind.
    pub fn adopt(spec: ProcessSpec) -> Option<Supervised> {
        let p = adoptable(&spec)?;
        info!(service = %spec.name, pid = p, "adopting running process left by a previous daemon");
        Some(Supervised::supervise_from(spec, Child::Adopted(p)))
    }

    fn supervise_from(spec: ProcessSpec, first: Child) -> Supervised {
        let pid = Arc::new(Mutex::new(None));
        let cancel = CancellationToken::new();
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let adopted = match &first {
            Child::Adopted(p) => Some(*p),
            Child::Spawned(_) => None,
        };
        let name = spec.name.clone();
        *pid.lock().unwrap_or_else(|p| p.into_inner()) = match &first {
            Child::Spawned(c) => c.id(),
            Child::Adopted(p) => Some(*p),
        };
        let pid_c = pid.clone();
        let cancel_c = cancel.clone();
        tokio::spawn(async move {
            supervise(spec, first, pid_c, cancel_c).await;
            let _ = done_tx.send(true);
        });
        Supervised {
            name,
            adopted: adopted.is_some(),
            pid,
            cancel,
            done,
        }
    }

    /// Was the process adopted from a previous daemon (rather than spawned by us)?
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Current PID, if running.
    pub fn pid(&self) -> Option<u32> {
        *self.pid.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop supervising and terminate the program: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, grace: Duration) {
        self.cancel.cancel();
        let Some(pid) = self.pid() else { return };
        // SAFETY: kill(2) on the PID we started or adopted.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = tokio::time::Instant::now() + grace;
        let mut done = self.done.clone();
        let exited = tokio::time::timeout_at(deadline, done.wait_for(|d| *d))
            .await
            .is_ok();
        if !exited || pid_alive(pid) {
            let until = tokio::time::Instant::now() + grace;
            while pid_alive(pid) && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if pid_alive(pid) {
                warn!(service = %self.name, pid, "did not stop after SIGTERM; sending SIGKILL");
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// The PID of a copy of `spec` left running by a previous daemon, which may be adopted only
/// when that daemon is proven dead — this process holds the state-dir lock
/// ([`crate::statelock::held`]), which no earlier daemon could still hold — and the process
/// is proven the one it started: its pid file (read only when it is a plain file of ours)
/// names a live process running `spec.program` (`/proc/<pid>/exe`) with exactly `spec.args`
/// (for the embedded etcd these carry its data dir).
fn adoptable(spec: &ProcessSpec) -> Option<u32> {
    adoptable_with(spec, crate::statelock::held().is_some())
}

/// [`adoptable`], with the proof that the previous daemon is dead given as `owner_dead`.
fn adoptable_with(spec: &ProcessSpec, owner_dead: bool) -> Option<u32> {
    if !owner_dead {
        return None;
    }
    let program = resolve_program(&spec.program)?;
    crate::securefs::read_trusted(&spec.pid_file)
        .ok()
        .flatten()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|p| {
            pid_alive(*p)
                && executable(*p).is_some_and(|exe| exe == program)
                && cmdline(*p).iter().skip(1).eq(spec.args.iter())
        })
}

/// The file `pid` executes (`/proc/<pid>/exe`; a binary replaced on disk since, e.g. by an
/// upgrade, still counts as its path). `None` when it cannot be read (gone, or not ours to
/// inspect): such a process is never adopted.
pub fn executable(pid: u32) -> Option<PathBuf> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let text = exe.to_string_lossy();
    Some(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

/// `program` as the kernel reports it in `/proc/<pid>/exe`: a path made canonical, a bare
/// name looked up in `PATH` first.
fn resolve_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return std::fs::canonicalize(program).ok();
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
            .and_then(|p| std::fs::canonicalize(p).ok())
    })
}

enum Child {
    Spawned(tokio::process::Child),
    Adopted(u32),
}

async fn spawn(spec: &ProcessSpec) -> Result<Child, ServiceError> {
    // Not through a symlink, and not readable by others (0640).
    let log = crate::securefs::open_log(&spec.log_file, 0o640).map_err(|e| ServiceError::Io {
        service: spec.name.clone(),
        message: e.to_string(),
    })?;
    let log2 = log.try_clone().map_err(|e| ServiceError::Io {
        service: spec.name.clone(),
        message: e.to_string(),
    })?;
    let child = Command::new(&spec.program)
        .args(&spec.args)
        // Our systemd notifications are ours alone (etcd would send its own READY=1).
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .spawn()
        .map_err(|source| ServiceError::Spawn {
            service: spec.name.clone(),
            program: spec.program.clone(),
            source,
        })?;
    let pid = child.id().unwrap_or(0);
    owned().push(pid);
    if let Err(e) =
        crate::securefs::write_file(&spec.pid_file, format!("{pid}\n").as_bytes(), 0o640)
    {
        warn!(service = %spec.name, error = %e, "cannot write the pid file; a restarted daemon will not adopt this process");
    }
    info!(service = %spec.name, pid, program = %spec.program.display(), log = %spec.log_file.display(), "started process");
    Ok(Child::Spawned(child))
}

async fn supervise(
    spec: ProcessSpec,
    mut child: Child,
    pid: Arc<Mutex<Option<u32>>>,
    cancel: CancellationToken,
) {
    let mut restarts: u32 = 0;
    loop {
        let id = match &child {
            Child::Spawned(c) => c.id(),
            Child::Adopted(p) => Some(*p),
        };
        *pid.lock().unwrap_or_else(|p| p.into_inner()) = id;
        let status = match &mut child {
            Child::Spawned(c) => {
                let st = c.wait().await;
                st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
            }
            Child::Adopted(p) => {
                while pid_alive(*p) {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                "exited".to_string()
            }
        };
        if let Some(p) = id {
            owned().retain(|x| *x != p);
        }
        *pid.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let _ = std::fs::remove_file(&spec.pid_file);
        if cancel.is_cancelled() {
            info!(service = %spec.name, status = %status, "process stopped");
            return;
        }
        restarts += 1;
        let delay = debvisor_objects::reactor::backoff(
            Duration::from_millis(500),
            Duration::from_secs(30),
            restarts,
        );
        warn!(service = %spec.name, status = %status, restarts, restart_in_ms = delay.as_millis() as u64,
            log = %spec.log_file.display(), "process exited unexpectedly; restarting");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        match spawn(&spec).await {
            Ok(c) => child = c,
            Err(e) => {
                warn!(service = %spec.name, error = %e, "restart failed; giving up on this service");
                return;
            }
        }
    }
}

/// `systemctl start|stop UNIT` with a timeout (systemd backend).
pub async fn systemctl(verb: &str, unit: &str, timeout: Duration) -> Result<(), ServiceError> {
    let cmd = format!("systemctl {verb} {unit}");
    let fut = Command::new("systemctl")
        .args([verb, "--no-ask-password", unit])
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(ServiceError::Command {
            service: unit.into(),
            command: cmd,
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }),
        Ok(Err(e)) => Err(ServiceError::Command {
            service: unit.into(),
            command: cmd,
            message: e.to_string(),
        }),
        Err(_) => Err(ServiceError::Timeout {
            service: unit.into(),
            command: cmd,
            timeout,
        }),
    }
}

/// Is PID 1 systemd (so the `auto` backend means `systemd`)?
pub fn systemd_is_pid1() -> bool {
    sd_notify::booted().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, secs: &str) -> ProcessSpec {
        ProcessSpec {
            name: "sleeper".into(),
            program: PathBuf::from("/bin/sleep"),
            args: vec![secs.into()],
            log_file: dir.join("sleeper.log"),
            pid_file: dir.join("sleeper.pid"),
        }
    }

    #[tokio::test]
    async fn process_backend_restarts_and_stops_by_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Supervised::start(spec(dir.path(), "30"))
            .await
            .expect("spawn sleep");
        let first = s.pid().expect("running");
        assert!(pid_alive(first));
        // Kill it behind the supervisor's back: it must come back with a new PID.
        // SAFETY: our own child.
        unsafe { libc::kill(first as i32, libc::SIGKILL) };
        let mut second = None;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(25)).await;
            if let Some(p) = s.pid() {
                if p != first {
                    second = Some(p);
                    break;
                }
            }
        }
        let second = second.expect("restarted");
        s.stop(Duration::from_secs(5)).await;
        for _ in 0..100 {
            if !pid_alive(second) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!pid_alive(second), "stopped");
        assert!(!dir.path().join("sleeper.pid").exists());
    }

    /// A process with the spec's arguments is adopted only with the previous daemon proven
    /// dead and when it runs the spec's binary.
    #[test]
    fn adoption_needs_a_dead_owner_and_the_same_binary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sp = spec(dir.path(), "30");
        sp.program = std::fs::canonicalize("/bin/sleep").expect("sleep");
        /// Kills and reaps the test's `sleep` however the test ends.
        struct Reaped(std::process::Child);
        impl Drop for Reaped {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = Reaped(
            std::process::Command::new(&sp.program)
                .arg("30")
                .spawn()
                .expect("spawn sleep"),
        );
        let pid = child.0.id();
        // spawn() returns once the vfork'd child has released our memory inside execve, a
        // little before the kernel sets its new argv: /proc/<pid>/cmdline can still be empty
        // (CI under load saw exactly that). Wait until the exec is complete.
        let exec_done = || {
            executable(pid).as_deref() == Some(sp.program.as_path())
                && cmdline(pid).get(1).map(String::as_str) == Some("30")
        };
        for _ in 0..500 {
            if exec_done() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(exec_done(), "sleep (pid {pid}) never finished its exec");
        crate::securefs::write_file(&sp.pid_file, format!("{pid}\n").as_bytes(), 0o640)
            .expect("pid file");
        assert_eq!(adoptable_with(&sp, true), Some(pid));
        // The owner not proven dead (no state-dir lock held): never.
        assert_eq!(adoptable_with(&sp, false), None);
        // The same arguments under another binary (a copy of sleep): not ours.
        let copy = dir.path().join("other-sleep");
        std::fs::copy(&sp.program, &copy).expect("copy sleep");
        let mut other = sp.clone();
        other.program = copy;
        assert_eq!(adoptable_with(&other, true), None);
        // Other arguments (another data dir, for etcd): not ours.
        let mut args = sp.clone();
        args.args = vec!["31".into()];
        assert_eq!(adoptable_with(&args, true), None);
        let _ = child.0.kill();
        let _ = child.0.wait();
        assert_eq!(adoptable_with(&sp, true), None, "a dead process");
    }

    #[tokio::test]
    async fn missing_program_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sp = spec(dir.path(), "1");
        sp.program = PathBuf::from("/nonexistent/etcd");
        let e = Supervised::start(sp).await.err().expect("must fail");
        assert!(e.to_string().contains("/nonexistent/etcd"), "{e}");
    }
}
