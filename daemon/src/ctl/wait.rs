//! Waiting for the cluster to act: `--wait`/`--timeout`, following an object's keys with a
//! watch until a verdict, and the failure a command reports (shared by the `vm`, `node` and
//! `ceph` commands).

use std::time::Duration;

use debvisor_objects::reactor::ObjectKeys as Keys;
use debvisor_objects::{KeyEntry, Store};
use etcd_client::EventType;

/// Parse a duration like `90s`, `3m`, `500ms`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = crate::config::parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: a timeout must be positive"));
    }
    Ok(d)
}

/// `--wait` and `--timeout`.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Block until the node reports the outcome (exit 1 on failure or timeout).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, e.g. 90s, 3m.
    #[arg(long, value_parser = parse_duration, default_value = "180s", value_name = "DURATION")]
    pub timeout: Duration,
}

/// A failed command: the message for stderr, and for `--output json` a document for stdout
/// (the current status when a wait failed).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// What went wrong.
    pub message: String,
    /// What to print on stdout anyway.
    pub stdout: Option<String>,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure {
            message,
            stdout: None,
        }
    }
}

/// How following an object ended.
pub(crate) enum Followed<T> {
    /// The check returned a verdict; with the keys it saw.
    Done(T, Keys),
    /// The deadline passed; with the last keys seen.
    TimedOut(Keys),
}

/// Follow the keys under `prefix` (relative names) with a watch, calling `check` on every
/// change until it returns a verdict or `timeout` passes. The watch starts right after a
/// list, so nothing between the two is missed; it is re-established (with a fresh list)
/// when it breaks, and a relist every few seconds covers a silently stalled stream.
pub(crate) async fn follow<T>(
    store: &Store,
    prefix: &str,
    timeout: Duration,
    mut check: impl FnMut(&Keys) -> Option<T>,
) -> Result<Followed<T>, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let relist_every = Duration::from_secs(5);
    let mut keys = Keys::new();
    loop {
        let (kvs, rev) = match tokio::time::timeout_at(deadline, store.list(prefix)).await {
            Ok(r) => r.map_err(crate::ctl::etcd_error)?,
            Err(_) => return Ok(Followed::TimedOut(keys)),
        };
        keys = kvs
            .into_iter()
            .filter_map(|kv| {
                let sub = kv.key.strip_prefix(prefix)?.to_string();
                Some((sub, KeyEntry::from(kv)))
            })
            .collect();
        if let Some(v) = check(&keys) {
            return Ok(Followed::Done(v, keys));
        }
        let mut stream = match tokio::time::timeout_at(deadline, store.watch(prefix, rev + 1)).await
        {
            Ok(Ok(s)) => Some(s),
            Ok(Err(_)) => None,
            Err(_) => return Ok(Followed::TimedOut(keys)),
        };
        let relist_at = (tokio::time::Instant::now() + relist_every).min(deadline);
        while let Some(s) = stream.as_mut() {
            let msg = match tokio::time::timeout_at(relist_at, s.message()).await {
                Ok(Ok(Some(m))) => m,
                // Broken or ended stream, or time for a relist.
                _ => break,
            };
            if msg.canceled() {
                break;
            }
            for ev in msg.events() {
                let Some(kv) = ev.kv().and_then(|kv| store.convert(kv)) else {
                    continue;
                };
                let Some(sub) = kv.key.strip_prefix(prefix) else {
                    continue;
                };
                match ev.event_type() {
                    EventType::Put => {
                        let sub = sub.to_string();
                        keys.insert(sub, KeyEntry::from(kv));
                    }
                    EventType::Delete => {
                        keys.remove(sub);
                    }
                }
            }
            if let Some(v) = check(&keys) {
                return Ok(Followed::Done(v, keys));
            }
        }
        if stream.is_none() {
            tokio::time::sleep_until(
                (tokio::time::Instant::now() + Duration::from_millis(200)).min(deadline),
            )
            .await;
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Followed::TimedOut(keys));
        }
    }
}

/// The progress lines of a `--wait`: each change of what is being waited for, as it
/// happens, on stderr (stdout keeps the result, and the JSON document with `-o json`), one
/// line with the time since the wait began: `[  2.1s] status starting on hv1 (…)`.
pub struct Progress {
    start: std::time::Instant,
    last: Option<String>,
    lines: Vec<String>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    /// A wait beginning now.
    pub fn new() -> Progress {
        Progress {
            start: std::time::Instant::now(),
            last: None,
            lines: Vec::new(),
        }
    }

    /// Print `what` unless it is what was printed last.
    pub fn show(&mut self, what: impl Into<String>) {
        let what = what.into();
        if self.last.as_deref() == Some(what.as_str()) {
            return;
        }
        let line = format!("[{:>6.1}s] {what}", self.start.elapsed().as_secs_f64());
        eprintln!("{line}");
        self.lines.push(line);
        self.last = Some(what);
    }

    /// Every line printed so far.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }
}

/// A timeout as an operator wrote it: `90s`, or `500ms` when it has a fraction.
pub(crate) fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "0s", "1.5s", "10d", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
