//! Driving the real `debvisord` / `debvisorctl` binaries of the `debvisor-daemon` package.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{tail_of, HarnessError, IoContext, Result};

/// Lines of output included in wait errors.
const ERROR_TAIL: usize = 40;
/// Poll interval of the wait helpers.
const POLL: Duration = Duration::from_millis(20);

/// The profile directory of the running test executable (`…/target/debug` for
/// `…/target/debug/deps/test-xxxx`).
fn profile_dir() -> std::result::Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let deps = exe
        .parent()
        .ok_or_else(|| format!("{} has no parent", exe.display()))?;
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent()
            .ok_or_else(|| format!("{} has no parent", deps.display()))?
    } else {
        deps
    };
    Ok(dir.to_path_buf())
}

/// Build the binaries of `package` in the profile of the running test; returns the profile
/// directory.
fn build_package_bins(package: &str) -> std::result::Result<PathBuf, String> {
    let dir = profile_dir()?;
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("cannot tell the profile from {}", dir.display()))?
        .to_owned();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "-p", package, "--bins"])
        .stdin(Stdio::null());
    // Without the variables `cargo test` set for this test process (the package's name,
    // manifest, …): build scripts watching them (ring watches CARGO_PKG_NAME and
    // CARGO_MANIFEST_DIR) would see them change and rebuild their crate and every dependent
    // at each alternation with a plain `cargo` run. User settings (CARGO_HOME, …) stay.
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        let set_by_cargo_test = [
            "CARGO_PKG_",
            "CARGO_BIN_EXE_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
        ]
        .iter()
        .any(|p| k.starts_with(p));
        if set_by_cargo_test || k == "OUT_DIR" {
            cmd.env_remove(k);
        }
    }
    if profile != "debug" {
        cmd.args(["--profile", &profile]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("running {cargo:?} build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{cargo:?} build -p {package} --bins` (profile {profile}) failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(dir)
}

/// Path of a binary of the `debvisor-daemon` package (`debvisord`, `debvisorctl`), built
/// once per test process with `$CARGO build -p debvisor-daemon --bins` in the profile of the
/// running test (CARGO_BIN_EXE_* is not available across packages).
///
/// # Panics
/// If the build fails (with cargo's stderr in the message) or the binary is missing.
pub fn bin_path(name: &str) -> PathBuf {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(|| build_package_bins("debvisor-daemon")) {
        Ok(dir) => {
            let path = dir.join(name);
            if !path.is_file() {
                panic!(
                    "debvisor-tests: {} does not exist after building debvisor-daemon",
                    path.display()
                );
            }
            path
        }
        Err(e) => panic!("debvisor-tests: building the daemon binaries failed: {e}"),
    }
}

/// Path of a helper binary of this package (`debvisor-tests`, e.g. `dvtest-udhcpc-script`):
/// cargo builds them before the integration tests of this package run; when the running test
/// is another package's, they are built once per test process like [`bin_path`].
///
/// # Panics
/// If the build fails or the binary is missing.
pub fn harness_bin_path(name: &str) -> PathBuf {
    if let Ok(dir) = profile_dir() {
        let path = dir.join(name);
        if path.is_file() {
            return path;
        }
    }
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(|| build_package_bins("debvisor-tests")) {
        Ok(dir) => {
            let path = dir.join(name);
            if !path.is_file() {
                panic!(
                    "debvisor-tests: {} does not exist after building debvisor-tests",
                    path.display()
                );
            }
            path
        }
        Err(e) => panic!("debvisor-tests: building the harness binaries failed: {e}"),
    }
}

/// Run `debvisorctl --config <config_path> args…` with a cleared environment plus `PATH` and
/// `env`, and return its output.
///
/// # Panics
/// If the binary cannot be built or spawned.
pub fn ctl(config_path: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    ctl_in(None, config_path, env, args)
}

/// [`ctl`] inside network namespace `netns` (`ip netns exec`), e.g. where a daemon runs
/// whose etcd endpoints are reachable only from there.
///
/// # Panics
/// If the binary cannot be built or spawned.
pub fn ctl_in(
    netns: Option<&str>,
    config_path: &Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> Output {
    let bin = bin_path("debvisorctl");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .arg("--config")
        .arg(config_path)
        .args(args)
        .stdin(Stdio::null());
    match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("debvisor-tests: running {}: {e}", bin.display()),
    }
}

/// Builder of a [`DaemonProcess`].
#[derive(Debug, Clone)]
pub struct DaemonBuilder {
    node: String,
    endpoints: Vec<String>,
    yaml: String,
    env: Vec<(String, String)>,
    state_dir: Option<PathBuf>,
    binary: Option<PathBuf>,
    netns: Option<String>,
}

impl DaemonBuilder {
    /// A daemon for node `node_name` (sets `DEBVISOR_NODE_NAME`).
    pub fn new(node_name: &str) -> Self {
        DaemonBuilder {
            node: node_name.to_owned(),
            endpoints: Vec::new(),
            yaml: String::new(),
            env: Vec::new(),
            state_dir: None,
            binary: None,
            netns: None,
        }
    }

    /// A daemon for node `node_name` on `etcd` driving real guests on `qemu:///system`
    /// (shutdown timeout 3 s, state kept in `state_dir` across restarts): the common setup of
    /// the tests with real KVM guests, which add their own settings.
    pub fn qemu(node_name: &str, etcd: &crate::etcd::EtcdProcess, state_dir: &Path) -> Self {
        DaemonBuilder::new(node_name)
            .endpoints(&[etcd.endpoint()])
            .env("DEBVISOR_HYPERVISOR_URI", crate::libvirt::QEMU_URI)
            .env("DEBVISOR_DOMAINS_SHUTDOWN_TIMEOUT", "3s")
            .state_dir(state_dir)
    }

    /// Run the daemon inside network namespace `name` (`ip netns exec`, which execs, so the
    /// PID is the daemon's).
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// etcd endpoints, passed comma-joined as `DEBVISOR_STORE_ENDPOINTS`.
    pub fn endpoints(mut self, endpoints: &[String]) -> Self {
        self.endpoints = endpoints.to_vec();
        self
    }

    /// YAML appended to the config file (which otherwise holds `{}`: the harness defaults
    /// travel as environment variables, so they do not clash with sections given here).
    pub fn yaml(mut self, extra_yaml: &str) -> Self {
        if !self.yaml.is_empty() && !self.yaml.ends_with('\n') {
            self.yaml.push('\n');
        }
        self.yaml.push_str(extra_yaml);
        self
    }

    /// Set (or override a harness default of) an environment variable of the daemon.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// A clustered node (`node.mode: clustered`) among `coordinators` (it takes part in the
    /// primary election when it is one of them). Several daemons on one etcd must be
    /// clustered: a standalone node refuses to share its prefix.
    pub fn clustered(self, coordinators: &[&str]) -> Self {
        self.env("DEBVISOR_NODE_MODE", "clustered")
            .env("DEBVISOR_NODE_COORDINATORS", &coordinators.join(","))
    }

    /// Use `path` as `DEBVISOR_PATHS_STATE_DIR` (default: `state/` in the daemon's temp dir).
    /// The directory is not removed on drop; use it to keep state across daemon restarts.
    pub fn state_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(path.into());
        self
    }

    /// Run another binary instead of [`bin_path`]`("debvisord")`.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// The environment the daemon gets (besides `PATH`): harness defaults overridden by
    /// [`DaemonBuilder::env`], for the temp dir `dir`.
    fn environment(&self, dir: &Path, state_dir: &Path) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            env.insert(k.to_owned(), v);
        };
        set("DEBVISOR_NODE_NAME", self.node.clone());
        set("DEBVISOR_STORE_ENDPOINTS", self.endpoints.join(","));
        set("DEBVISOR_HYPERVISOR_URI", "test:///default".into());
        set("DEBVISOR_PATHS_STATE_DIR", state_dir.display().to_string());
        set(
            "DEBVISOR_PATHS_RUN_DIR",
            dir.join("run").display().to_string(),
        );
        set("DEBVISOR_LOGGING_FORMAT", "json".into());
        set("DEBVISOR_LOGGING_TARGET", "stderr".into());
        set("DEBVISOR_KEEPALIVE_INTERVAL", "1s".into());
        set("DEBVISOR_KEEPALIVE_LEASE_TTL", "3s".into());
        set("DEBVISOR_NETWORKING_SYSCTL_APPLY", "false".into());
        set("DEBVISOR_STORE_STARTUP_DEADLINE", "30s".into());
        set("RUST_BACKTRACE", "1".into());
        for (k, v) in &self.env {
            env.insert(k.clone(), v.clone());
        }
        env
    }

    /// Write the config file and spawn `debvisord --config <dir>/debvisord.yaml` (working
    /// directory: the temp dir) with a cleared environment plus `PATH`, the harness variables
    /// and `RUST_BACKTRACE=1`. Output is captured line by line.
    pub fn spawn(self) -> Result<DaemonProcess> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("debvisord-{}-", self.node))
            .tempdir()
            .ctx(|| "creating the daemon temp dir".to_owned())?;
        let state_dir = match &self.state_dir {
            Some(p) => p.clone(),
            None => {
                let p = dir.path().join("state");
                std::fs::create_dir(&p).ctx(|| format!("creating {}", p.display()))?;
                p
            }
        };
        let config_path = dir.path().join("debvisord.yaml");
        let yaml = if self.yaml.trim().is_empty() {
            "{}\n".to_owned()
        } else {
            self.yaml.clone()
        };
        std::fs::write(&config_path, yaml).ctx(|| format!("writing {}", config_path.display()))?;
        let env = self.environment(dir.path(), &state_dir);
        let binary = match &self.binary {
            Some(b) => b.clone(),
            None => bin_path("debvisord"),
        };
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        let mut child = cmd
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(&env)
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ctx(|| format!("spawning {}", binary.display()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let prefix = format!("[debvisord {}]", self.node);
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let pipe = out.as_fd().try_clone_to_owned().ok();
            readers.extend(spawn_reader(out, lines.clone(), prefix.clone()).map(|h| (h, pipe)));
        }
        if let Some(err) = child.stderr.take() {
            let pipe = err.as_fd().try_clone_to_owned().ok();
            readers.extend(spawn_reader(err, lines.clone(), prefix).map(|h| (h, pipe)));
        }
        Ok(DaemonProcess {
            node: self.node,
            netns: self.netns,
            child,
            lines,
            readers,
            drained: false,
            config_path,
            state_dir,
            env,
            dir: Some(dir),
        })
    }
}

/// Read `stream` line by line into `lines`, echoing each to stderr with `prefix`; the
/// reader's handle, so that an exit can wait for the last lines (see
/// [`DaemonProcess::drain_output`]).
fn spawn_reader(
    stream: impl Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
    prefix: String,
) -> Option<std::thread::JoinHandle<()>> {
    let spawned = std::thread::Builder::new()
        .name(format!("{prefix} reader"))
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_owned();
                        eprintln!("{prefix} {line}");
                        lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                    }
                }
            }
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("debvisor-tests: spawning an output reader: {e}");
            None
        }
    }
}

/// How long an exited daemon's output readers are waited for at most.
const DRAIN_BOUND: Duration = Duration::from_secs(5);
/// The readers count as drained, even before EOF, once nothing is left in their pipes and no
/// line has come for this long: the guardian inherits the daemon's stderr (its log), so EOF
/// can come seconds after the exit (a killed daemon's guardian waits for its deadlines).
const DRAIN_QUIET: Duration = Duration::from_millis(500);

/// Bytes written to `pipe` and not yet read (`FIONREAD`); `None` when it cannot be asked.
fn queued(pipe: &OwnedFd) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the valid pointer; the fd is ours (a dup).
    let r = unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) };
    (r == 0).then(|| usize::try_from(n).unwrap_or(0))
}

/// A running `debvisord` with captured output.
///
/// Dropping it SIGKILLs the process (by PID) if it still runs, reaps it and removes its temp
/// directory (a state dir given to [`DaemonBuilder::state_dir`] is left alone).
#[derive(Debug)]
pub struct DaemonProcess {
    node: String,
    /// Network namespace the daemon runs in (`debvisorctl` runs there too).
    netns: Option<String>,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// The stdout and stderr readers, each with a dup of its pipe's read end (see
    /// [`DaemonProcess::drain_output`]).
    readers: Vec<(std::thread::JoinHandle<()>, Option<OwnedFd>)>,
    /// The output was drained after the exit (once is enough: later lines are the
    /// guardian's).
    drained: bool,
    config_path: PathBuf,
    state_dir: PathBuf,
    env: BTreeMap<String, String>,
    dir: Option<tempfile::TempDir>,
}

/// Is `v` a log line whose message is exactly `m`?
pub fn is_message(v: &Value, m: &str) -> bool {
    v.get("message").and_then(Value::as_str) == Some(m)
}

/// A string field of a log line.
pub fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

impl DaemonProcess {
    /// Wait for the last startup stage (`keepalive`): the daemon is in `run`.
    pub fn wait_run(&mut self, timeout: Duration) -> Result<Value> {
        self.wait_for(
            |v| is_message(v, "stage complete") && str_field(v, "stage") == Some("keepalive"),
            timeout,
        )
    }

    /// The stage that failed and its error, from the daemon's `outcome=failed` line.
    pub fn failed_stage(&self) -> Option<(String, String)> {
        self.json_lines()
            .into_iter()
            .find(|v| str_field(v, "outcome") == Some("failed"))
            .map(|v| {
                (
                    str_field(&v, "stage").unwrap_or_default().to_owned(),
                    str_field(&v, "error").unwrap_or_default().to_owned(),
                )
            })
    }

    /// The node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// PID of the daemon.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// All output lines so far (stdout and stderr interleaved in arrival order).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The output lines that parse as JSON (the daemon's log events), in order.
    pub fn json_lines(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    /// The last `n` output lines joined with newlines.
    pub fn tail(&self, n: usize) -> String {
        tail_of(&self.lines(), n)
    }

    /// Check a wait: `Ok(Some(v))` on a match, an error if the daemon exited or the deadline
    /// passed, `Ok(None)` to keep waiting. `seen` counts JSON lines already checked.
    fn poll_once(
        &mut self,
        pred: &dyn Fn(&Value) -> bool,
        seen: &mut usize,
        what: &str,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<Option<Value>> {
        // Check exit before reading lines, so lines written just before exit are still seen.
        let exited = self.child.try_wait().ok().flatten();
        let lines = self.lines();
        for line in lines.iter().skip(*seen) {
            *seen += 1;
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                if pred(&v) {
                    return Ok(Some(v));
                }
            }
        }
        if let Some(status) = exited {
            self.drain_output();
            let lines = self.lines();
            for line in lines.iter().skip(*seen) {
                *seen += 1;
                if let Ok(v) = serde_json::from_str::<Value>(line) {
                    if pred(&v) {
                        return Ok(Some(v));
                    }
                }
            }
            return Err(HarnessError::Exited {
                what: what.to_owned(),
                status: status.to_string(),
                tail: tail_of(&lines, ERROR_TAIL),
            });
        }
        if Instant::now() >= deadline {
            return Err(HarnessError::Timeout {
                what: what.to_owned(),
                timeout,
                tail: tail_of(&lines, ERROR_TAIL),
            });
        }
        Ok(None)
    }

    /// Wait (polling every 20 ms, blocking the thread) for a JSON log line matching `pred`,
    /// looking at all lines since the start; fails on timeout or daemon exit with the last 40
    /// lines in the error.
    pub fn wait_for(&mut self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        self.wait_for_described(&pred, "a matching log line", timeout)
    }

    fn wait_for_described(
        &mut self,
        pred: &dyn Fn(&Value) -> bool,
        what: &str,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            if let Some(v) = self.poll_once(pred, &mut seen, what, timeout, deadline)? {
                return Ok(v);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Like [`DaemonProcess::wait_for`] but sleeping with tokio, for async tests whose runtime
    /// must keep running other tasks meanwhile.
    pub async fn wait_for_async(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            if let Some(v) =
                self.poll_once(&pred, &mut seen, "a matching log line", timeout, deadline)?
            {
                return Ok(v);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Wait for a JSON log line whose `"message"` contains `substr`.
    pub fn wait_for_message(&mut self, substr: &str, timeout: Duration) -> Result<Value> {
        let pred = |v: &Value| {
            v.get("message")
                .and_then(Value::as_str)
                .is_some_and(|m| m.contains(substr))
        };
        self.wait_for_described(&pred, &format!("a message containing {substr:?}"), timeout)
    }

    /// Send signal `sig` (e.g. `libc::SIGTERM`) to the daemon. Fails if it has been reaped.
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(HarnessError::State(format!(
                "cannot signal debvisord {}: it already exited ({status})",
                self.node
            )));
        }
        crate::etcd::send_signal(self.child.id(), sig)
    }

    /// SIGKILL the daemon (if it still runs) and reap it.
    pub fn kill(&mut self) -> Result<()> {
        if matches!(self.child.try_wait(), Ok(None)) {
            crate::etcd::send_signal(self.child.id(), libc::SIGKILL)?;
        }
        self.child
            .wait()
            .ctx(|| format!("reaping debvisord {}", self.node))?;
        Ok(())
    }

    /// After the daemon exited: wait until its output readers have read the last lines it
    /// wrote — each reader at EOF, or its pipe empty with no new line for [`DRAIN_QUIET`]
    /// (the guardian may hold stderr open) — at most [`DRAIN_BOUND`], once per process.
    /// Under load a reader thread runs well after the exit is seen, and "exited, then look
    /// for its last line" must not miss that line.
    fn drain_output(&mut self) {
        if std::mem::replace(&mut self.drained, true) {
            return;
        }
        let deadline = Instant::now() + DRAIN_BOUND;
        let count = || self.lines.lock().unwrap_or_else(|p| p.into_inner()).len();
        let mut seen = count();
        let mut quiet_since = Instant::now();
        loop {
            let done = self.readers.iter().all(|(reader, pipe)| {
                reader.is_finished()
                    || (quiet_since.elapsed() >= DRAIN_QUIET
                        && pipe.as_ref().and_then(queued) == Some(0))
            });
            if done || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(POLL);
            let now = count();
            if now != seen {
                seen = now;
                quiet_since = Instant::now();
            }
        }
    }

    /// Wait (polling `try_wait` every 20 ms) up to `timeout` for the daemon to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .ctx(|| format!("waiting for debvisord {}", self.node))?
            {
                self.drain_output();
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("debvisord {} to exit", self.node),
                    timeout,
                    tail: self.tail(ERROR_TAIL),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether the daemon is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The daemon's state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The config file passed with `--config` (reuse it for [`ctl`]).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The environment given to the daemon (besides `PATH`).
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    /// Run `debvisorctl` with this daemon's config and environment, in the daemon's network
    /// namespace if it has one.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        ctl_in(self.netns.as_deref(), &self.config_path, &env, args)
    }

    /// The network namespace the daemon runs in, `None` for the test's own.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// [`DaemonProcess::ctl`] that must succeed; returns its stdout.
    ///
    /// # Panics
    /// If `debvisorctl` exits non-zero (its output is in the message).
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "debvisorctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // Graceful first, so the daemon stops what it started (dnsmasq); SIGKILL after 3 s.
            // SAFETY: kill(2) on the PID of our own unreaped child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on the PID of our own unreaped child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        }
        if let Err(e) = self.child.wait() {
            eprintln!("debvisor-tests: reaping debvisord {}: {e}", self.node);
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!("debvisor-tests: removing {}: {e}", path.display());
            }
        }
    }
}
