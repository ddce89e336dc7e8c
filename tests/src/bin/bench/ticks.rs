//! etcd requests per keepalive tick, shared by the foundation figure and the VM figure
//! with VMs: etcd's own Prometheus counters (`GET /metrics`) before and after a window of
//! ticks, where a tick is a distinct `mod_revision` of a node's `last_seen` key seen by a
//! watch opened before the window.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use debvisor_tests::EtcdProcess;

use crate::BenchResult;

/// Keepalive interval of the requests-per-tick figure.
pub(crate) const TICK_INTERVAL: Duration = Duration::from_secs(1);
/// Lease TTL of the requests-per-tick figure.
pub(crate) const TICK_TTL: Duration = Duration::from_secs(3);
/// Ticks skipped after `run` before the counting window starts.
pub(crate) const WARMUP_TICKS: usize = 2;
/// Largest `/metrics` response accepted.
const METRICS_MAX_BYTES: u64 = 32 * 1024 * 1024;

/// Parsed Prometheus text exposition: `(name, labels) → value`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metrics {
    pub(crate) series: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    /// Parse the text format (comments and unparsable lines are skipped).
    pub(crate) fn parse(text: &str) -> Metrics {
        let series = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_sample)
            .collect();
        Metrics { series }
    }

    /// Sum of every series named `name` whose labels include all of `labels`; `None` when no
    /// series matches.
    pub(crate) fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for (n, l, v) in &self.series {
            if n == name
                && labels
                    .iter()
                    .all(|(k, want)| l.get(*k).map(String::as_str) == Some(*want))
            {
                found = true;
                total += v;
            }
        }
        found.then_some(total)
    }
}

/// Parse one sample line `name{k="v",…} value [timestamp]`.
fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let mut labels = BTreeMap::new();
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            let name = &line[..i];
            let mut chars = line[i + 1..].char_indices();
            let body_start = i + 1;
            // Scan label pairs until the closing brace, honouring escapes in values.
            let mut end = None;
            let mut key = String::new();
            let mut val = String::new();
            let mut in_val = false;
            let mut esc = false;
            while let Some((j, c)) = chars.next() {
                if in_val {
                    if esc {
                        val.push(match c {
                            'n' => '\n',
                            other => other,
                        });
                        esc = false;
                    } else if c == '\\' {
                        esc = true;
                    } else if c == '"' {
                        labels.insert(std::mem::take(&mut key), std::mem::take(&mut val));
                        in_val = false;
                    } else {
                        val.push(c);
                    }
                    continue;
                }
                match c {
                    '}' => {
                        end = Some(body_start + j + 1);
                        break;
                    }
                    '=' => {
                        // Expect an opening quote next.
                        if chars.next().map(|(_, q)| q) != Some('"') {
                            return None;
                        }
                        in_val = true;
                    }
                    ',' | ' ' => {}
                    other => key.push(other),
                }
            }
            (name, &line[end?..])
        }
        Some(i) => (&line[..i], &line[i..]),
        None => return None,
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name.to_owned(), labels, value))
}

/// `GET /metrics` over plain HTTP/1.0 on `addr`.
pub(crate) fn fetch_metrics(addr: SocketAddr) -> BenchResult<Metrics> {
    let io = |what: &str, e: std::io::Error| format!("GET http://{addr}/metrics: {what}: {e}");
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| io("connect", e))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| io("set_read_timeout", e))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| io("set_write_timeout", e))?;
    s.write_all(
        format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n").as_bytes(),
    )
    .map_err(|e| io("write", e))?;
    let mut buf = Vec::new();
    s.take(METRICS_MAX_BYTES)
        .read_to_end(&mut buf)
        .map_err(|e| io("read", e))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET http://{addr}/metrics: no header/body separator"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("GET http://{addr}/metrics: {status}"));
    }
    Ok(Metrics::parse(body))
}

/// A watch event forwarded by the watcher task.
pub(crate) enum WatchMsg {
    /// A put of `last_seen` with its mod_revision, seen at the given instant.
    Put(i64, Instant),
    /// The watcher failed.
    Failed(String),
}

/// Watch `key` on `etcd` and forward every put to `tx`.
pub(crate) async fn watch_key(endpoint: String, key: String, tx: mpsc::Sender<WatchMsg>) {
    let res: Result<(), String> = async {
        let mut c = etcd_client::Client::connect([endpoint.as_str()], None)
            .await
            .map_err(|e| format!("connecting the watcher to {endpoint}: {e}"))?;
        let mut stream = c
            .watch(key.as_str(), None)
            .await
            .map_err(|e| format!("watching {key}: {e}"))?;
        loop {
            let msg = stream
                .message()
                .await
                .map_err(|e| format!("watch {key}: {e}"))?
                .ok_or_else(|| format!("watch {key}: stream closed"))?;
            if msg.canceled() {
                return Err(format!("watch {key} canceled by etcd"));
            }
            let now = Instant::now();
            for ev in msg.events() {
                if ev.event_type() == etcd_client::EventType::Put {
                    if let Some(kv) = ev.kv() {
                        if tx.send(WatchMsg::Put(kv.mod_revision(), now)).is_err() {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
    .await;
    if let Err(e) = res {
        let _ = tx.send(WatchMsg::Failed(e));
    }
}

/// Receive the next put (skipping nothing), failing on watcher error or after `timeout`.
pub(crate) fn next_put(
    rx: &mpsc::Receiver<WatchMsg>,
    timeout: Duration,
) -> BenchResult<(i64, Instant)> {
    match rx.recv_timeout(timeout) {
        Ok(WatchMsg::Put(rev, at)) => Ok((rev, at)),
        Ok(WatchMsg::Failed(e)) => Err(e),
        Err(e) => Err(format!("no last_seen update within {timeout:?}: {e}")),
    }
}

/// Type of the measured window: ticks, window length, first/last revision, metrics before
/// and after.
pub(crate) type Window = (usize, Duration, (i64, i64), Metrics, Metrics);

/// Wait for warm-up ticks, snapshot metrics half an interval after a tick, count `n` ticks,
/// snapshot again half an interval after the last; ticks are the distinct mod_revisions whose
/// watch events arrived between the two snapshots.
pub(crate) fn count_window(
    etcd: &EtcdProcess,
    rx: &mpsc::Receiver<WatchMsg>,
    n: usize,
) -> BenchResult<Window> {
    let tick_timeout = TICK_INTERVAL * 5;
    let half = TICK_INTERVAL / 2;
    let addr = etcd.client_addr();
    for _ in 0..WARMUP_TICKS {
        next_put(rx, tick_timeout)?;
    }
    std::thread::sleep(half);
    let t_a = Instant::now();
    let before = fetch_metrics(addr)?;
    let mut revs: Vec<(i64, Instant)> = Vec::with_capacity(n + 2);
    // Bounded: at most n puts (each within tick_timeout) plus stragglers.
    while revs.iter().filter(|(_, at)| *at > t_a).count() < n {
        revs.push(next_put(rx, tick_timeout)?);
    }
    std::thread::sleep(half);
    let after = fetch_metrics(addr)?;
    let t_b = Instant::now();
    while let Ok(msg) = rx.try_recv() {
        match msg {
            WatchMsg::Put(rev, at) => revs.push((rev, at)),
            WatchMsg::Failed(e) => return Err(e),
        }
    }
    let mut inside: Vec<i64> = revs
        .iter()
        .filter(|(_, at)| *at > t_a && *at < t_b)
        .map(|(r, _)| *r)
        .collect();
    inside.sort_unstable();
    inside.dedup();
    let first = inside.first().copied().unwrap_or(0);
    let last = inside.last().copied().unwrap_or(0);
    Ok((
        inside.len(),
        t_b.duration_since(t_a),
        (first, last),
        before,
        after,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_samples() {
        let m = Metrics::parse(
            "# HELP x y\n\
             grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 7\n\
             grpc_server_handled_total{grpc_code=\"Unavailable\",grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 2\n\
             etcd_mvcc_put_total 3\n\
             weird{a=\"x\\\"}y\"} 1e3\n",
        );
        assert_eq!(
            m.sum("grpc_server_handled_total", &[("grpc_method", "Txn")]),
            Some(9.0)
        );
        assert_eq!(m.sum("etcd_mvcc_put_total", &[]), Some(3.0));
        assert_eq!(m.sum("weird", &[("a", "x\"}y")]), Some(1000.0));
        assert_eq!(m.sum("missing", &[]), None);
    }
}
