//! [`Firewall`]: the host trait the reconcilers use, and [`Nft`], its implementation that runs
//! the `nft` binary (optionally inside a network namespace) with a timeout on every call.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::drift::Drift;
use crate::error::{FirewallError, Location, Problem};
use crate::model::{batch_of, removal_batch, Ruleset};
use crate::observe::Observed;
use crate::table::TABLE;

/// What [`Firewall::ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The ruleset was (re)applied.
    pub changed: bool,
    /// Why: how the table differed from the model before the apply.
    pub drift: Option<Drift>,
}

/// The node's nftables table, as the reconcilers see it.
///
/// Implementations block (they run commands): call them from a blocking thread
/// (`tokio::task::spawn_blocking`), never on the async runtime.
pub trait Firewall: Send + Sync {
    /// Replace the whole content of table `inet debvisor` with `ruleset`, atomically: either
    /// the new ruleset is in force afterwards or the previous one still is.
    fn apply(&self, ruleset: &Ruleset) -> Result<(), FirewallError>;

    /// What the table holds now.
    fn read_back(&self) -> Result<Observed, FirewallError>;

    /// Delete table `inet debvisor` (success when it is already gone). Other tables are untouched.
    fn remove(&self) -> Result<(), FirewallError>;

    /// Level-triggered reconcile: read the table back and apply `ruleset` only when it differs.
    fn ensure(&self, ruleset: &Ruleset) -> Result<Outcome, FirewallError> {
        let observed = self.read_back()?;
        match ruleset.diff(&observed) {
            None => Ok(Outcome {
                changed: false,
                drift: None,
            }),
            Some(drift) => {
                if !drift.table_missing {
                    warn!(table = TABLE, %drift, "nft table drifted from the model; re-applying");
                }
                self.apply(ruleset)?;
                Ok(Outcome {
                    changed: true,
                    drift: Some(drift),
                })
            }
        }
    }
}

/// Default limit for one `nft` invocation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most `nft -c` runs spent looking for the rule nft refused (a binary search over the batch).
const MAX_LOCATE_RUNS: usize = 24;

/// [`Firewall`] through the `nft` binary (`nft -j -f -` with one JSON batch per apply).
///
/// The `nftables` crate renders the batch, but this type runs nft itself: the crate's helper
/// has no timeout and drops nft's stderr, which is the only place nft says what it refused.
/// nft does not say *which* rule it refused either (its JSON errors carry no position, except
/// for a parse error's command index), so on failure `apply` binary-searches the shortest
/// failing prefix of the batch with `nft -c` (nothing committed) and names that rule in
/// [`FirewallError::Rejected`]. After a successful apply the table is read back and compared.
#[derive(Debug, Clone)]
pub struct Nft {
    program: OsString,
    netns: Option<String>,
    timeout: Duration,
}

impl Default for Nft {
    fn default() -> Self {
        Nft::new()
    }
}

/// Output of one command that ran to completion.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Nft {
    /// `nft` from `PATH`, in the caller's network namespace, [`DEFAULT_TIMEOUT`] per call.
    pub fn new() -> Nft {
        Nft {
            program: "nft".into(),
            netns: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Run nft inside the named network namespace (`ip netns exec <name> nft …`).
    pub fn with_netns(mut self, name: &str) -> Result<Nft, FirewallError> {
        if name.is_empty() || name.contains(['/', '\0']) || name == "." || name == ".." {
            return Err(FirewallError::Invalid(vec![Problem {
                path: "netns".into(),
                reason: format!("{name:?} is not a network namespace name"),
            }]));
        }
        self.netns = Some(name.to_owned());
        Ok(self)
    }

    /// Use another nft binary.
    pub fn with_program(mut self, program: impl Into<OsString>) -> Nft {
        self.program = program.into();
        self
    }

    /// Limit each nft invocation to `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Nft {
        self.timeout = timeout;
        self
    }

    /// The namespace nft runs in, if not the caller's.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Ask nft whether it would accept `ruleset` (`nft -c`: checked by the kernel, not committed).
    pub fn check(&self, ruleset: &Ruleset) -> Result<(), FirewallError> {
        let json = ruleset.to_json()?;
        let out = self.run(&["-c", "-j", "-f", "-"], Some(json.into_bytes()))?;
        if out.status.success() {
            return Ok(());
        }
        Err(FirewallError::Rejected {
            location: self.locate(ruleset, &out.stderr),
            stderr: clean_stderr(&out.stderr),
        })
    }

    fn command_line(&self, args: &[&str]) -> String {
        let mut parts: Vec<String> = Vec::new();
        if let Some(ns) = &self.netns {
            parts.extend(["ip", "netns", "exec", ns].map(str::to_owned));
        }
        parts.push(self.program.to_string_lossy().into_owned());
        parts.extend(args.iter().map(|a| (*a).to_owned()));
        parts.join(" ")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.args(args);
        cmd
    }

    /// Run nft with `args` (and `stdin`), killing it after the timeout. Errors only when it
    /// could not run or timed out; the exit status is the caller's to judge.
    fn run(&self, args: &[&str], stdin: Option<Vec<u8>>) -> Result<Output, FirewallError> {
        let command = self.command_line(args);
        let started = Instant::now();
        let mut child = self
            .command(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| FirewallError::Spawn {
                command: command.clone(),
                source,
            })?;
        // Feed stdin and drain stdout/stderr on their own threads so a large batch or listing
        // cannot deadlock against a full pipe.
        let writer = match (stdin, child.stdin.take()) {
            (Some(data), Some(mut pipe)) => Some(thread::spawn(move || {
                // A write error means nft exited early; its status and stderr tell why.
                let _ = pipe.write_all(&data);
            })),
            _ => None,
        };
        let stdout = reader(child.stdout.take());
        let stderr = reader(child.stderr.take());
        let status = wait_timeout(&mut child, self.timeout);
        if let Some(w) = writer {
            let _ = w.join();
        }
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        let status = match status {
            Ok(Some(status)) => status,
            Ok(None) => {
                return Err(FirewallError::Timeout {
                    command,
                    timeout: self.timeout,
                })
            }
            Err(source) => return Err(FirewallError::Spawn { command, source }),
        };
        debug!(%command, ?status, elapsed_ms = started.elapsed().as_millis() as u64, "nft");
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Find the batch command nft refused: nft names the index for JSON parse errors; for
    /// errors from the kernel it does not, so binary-search the shortest failing prefix of the
    /// batch with `nft -c` (check only, nothing is committed).
    fn locate(&self, ruleset: &Ruleset, stderr: &str) -> Option<Location> {
        let commands = ruleset.commands();
        if let Some(i) = parse_index(stderr) {
            return commands.get(i).map(|(_, l)| l.clone());
        }
        let check = |n: usize| -> Option<bool> {
            let batch = batch_of(commands[..n].iter().map(|(c, _)| c.clone()));
            let json = serde_json::to_vec(&batch).ok()?;
            let out = self.run(&["-c", "-j", "-f", "-"], Some(json)).ok()?;
            Some(out.status.success())
        };
        // Invariant: prefix `lo` passes, prefix `hi` fails.
        let (mut lo, mut hi) = (0usize, commands.len());
        if check(hi)? {
            return None; // does not fail (any more): nothing to point at
        }
        let mut runs = 1;
        while hi - lo > 1 && runs < MAX_LOCATE_RUNS {
            let mid = lo + (hi - lo) / 2;
            if check(mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
            runs += 1;
        }
        (hi - lo == 1).then(|| commands[hi - 1].1.clone())
    }
}

impl Firewall for Nft {
    fn apply(&self, ruleset: &Ruleset) -> Result<(), FirewallError> {
        let started = Instant::now();
        let json = ruleset.to_json()?;
        let out = self.run(&["-j", "-f", "-"], Some(json.into_bytes()))?;
        if !out.status.success() {
            let err = FirewallError::Rejected {
                location: self.locate(ruleset, &out.stderr),
                stderr: clean_stderr(&out.stderr),
            };
            warn!(table = TABLE, netns = ?self.netns, error = %err, "nft apply failed; previous ruleset kept");
            return Err(err);
        }
        // nft 1.0.6 exits 0 on input it cannot parse as JSON at all: trust the read-back, not
        // the exit status.
        let observed = self.read_back()?;
        if let Some(drift) = ruleset.diff(&observed) {
            return Err(FirewallError::NotApplied(Box::new(drift)));
        }
        info!(
            table = TABLE,
            netns = ?self.netns,
            chains = ruleset.chains().len(),
            rules = ruleset.rule_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "nft ruleset applied"
        );
        Ok(())
    }

    fn read_back(&self) -> Result<Observed, FirewallError> {
        let args = ["-j", "list", "table", "inet", TABLE];
        let out = self.run(&args, None)?;
        if out.status.success() {
            return Observed::from_nft_json(&out.stdout).map_err(|reason| FirewallError::Parse {
                command: self.command_line(&args),
                reason,
            });
        }
        // Tell "no such table" from a real failure without relying on nft's (localised) text.
        let tables_args = ["-j", "list", "tables", "inet"];
        let tables = self.run(&tables_args, None)?;
        if tables.status.success() {
            let t =
                Observed::from_nft_json(&tables.stdout).map_err(|reason| FirewallError::Parse {
                    command: self.command_line(&tables_args),
                    reason,
                })?;
            if !t.table_present {
                return Ok(Observed::absent());
            }
        }
        Err(FirewallError::Command {
            command: self.command_line(&args),
            status: out.status.to_string(),
            stderr: clean_stderr(&out.stderr),
        })
    }

    fn remove(&self) -> Result<(), FirewallError> {
        let json = serde_json::to_vec(&removal_batch())
            .map_err(|e| FirewallError::Render(e.to_string()))?;
        let out = self.run(&["-j", "-f", "-"], Some(json))?;
        if !out.status.success() {
            return Err(FirewallError::Rejected {
                location: Some(Location::Table),
                stderr: clean_stderr(&out.stderr),
            });
        }
        let observed = self.read_back()?;
        if observed.table_present {
            return Err(FirewallError::Command {
                command: self.command_line(&["-j", "-f", "-"]),
                status: out.status.to_string(),
                stderr: format!("table inet {TABLE} is still present after deleting it"),
            });
        }
        info!(table = TABLE, netns = ?self.netns, "nft table removed");
        Ok(())
    }
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Wait for `child` up to `timeout`; kill and reap it when the time is up (`Ok(None)`).
fn wait_timeout(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            // `ip netns exec` execs nft, so the child is nft itself: nothing else to kill.
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// nft's stderr without its meaningless `internal:0:0-0: ` position prefix and blank lines.
fn clean_stderr(stderr: &str) -> String {
    stderr
        .lines()
        .map(|l| l.trim_start_matches("internal:0:0-0: ").trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The command index of "Parsing command array at index N failed."
fn parse_index(stderr: &str) -> Option<usize> {
    let rest = &stderr[stderr.find("command array at index ")? + 23..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_is_cleaned_and_indexes_found() {
        let e = "internal:0:0-0: Error: Unknown object passed to add command.\n\ninternal:0:0-0: Error: Parsing command array at index 12 failed.\n";
        assert_eq!(
            clean_stderr(e),
            "Error: Unknown object passed to add command.; Error: Parsing command array at index 12 failed."
        );
        assert_eq!(parse_index(e), Some(12));
        assert_eq!(parse_index("Error: Could not process rule"), None);
    }

    #[test]
    fn command_lines() {
        let n = Nft::new().with_netns("node-1").unwrap();
        assert_eq!(
            n.command_line(&["-j", "list", "tables"]),
            "ip netns exec node-1 nft -j list tables"
        );
        assert!(Nft::new().with_netns("../x").is_err());
        assert!(Nft::new().with_netns("").is_err());
    }

    /// Children of this process whose command name is `comm`, running or zombie (`/proc`).
    fn children_named(comm: &str) -> Vec<u32> {
        let me = std::process::id();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (head, rest) = stat.rsplit_once(')')?;
                let name = head.split_once('(')?.1;
                let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
                (ppid == me && name == comm).then_some(pid)
            })
            .collect()
    }

    #[test]
    fn missing_binary_and_timeout_are_errors() {
        let n = Nft::new().with_program("/nonexistent/nft");
        assert!(matches!(n.read_back(), Err(FirewallError::Spawn { .. })));
        let n = Nft::new()
            .with_program("sleep")
            .with_timeout(Duration::from_millis(100));
        // `sleep -j …` fails fast; use a real sleep through `run`.
        let r = n.run(&["5"], None);
        match r {
            Err(FirewallError::Timeout { command, timeout }) => {
                assert_eq!(command, "sleep 5");
                assert_eq!(timeout, Duration::from_millis(100));
            }
            other => panic!("want Timeout, got {:?}", other.err()),
        }
        // Killed and reaped at the timeout: neither still sleeping nor left a zombie (the
        // only way `run` could have returned before the 5 s are up without waiting for it).
        assert_eq!(
            children_named("sleep"),
            Vec::<u32>::new(),
            "sleep 5 left behind"
        );
    }
}
