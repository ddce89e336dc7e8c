//! Ceph-object figure of `debvisor-bench` (`--ceph-objects`): how long a snapshot request
//! written to etcd takes to exist in Ceph.
//!
//! A real one-host Ceph ([`CephCluster`]: 1 mon, 1 mgr, 2 memstore OSDs, cephx), a private
//! etcd and one standalone `debvisord` with `ceph.enabled` (the primary). A pool (size 1)
//! and an 8 MiB volume are declared and awaited; then, one after another, [`SNAPSHOTS`]
//! snapshot specs `ceph/volumes/<pool>:<image>/snapshots/b<i>/spec` are written. Per
//! snapshot: *write → `rbd snap ls` shows it* (the bench polls `rbd snap ls` every 10 ms;
//! the time is taken when the call that shows it returns, so it includes up to one call of
//! `rbd snap ls`, whose own duration is reported too), *write → `ceph volume step done`*
//! (the daemon's log timestamp of the `rbd snap create` that returned; same host clock), and
//! *write → status `ready` in etcd* (polled every 5 ms after the snapshot showed in Ceph).
//!
//! Every process is owned by a local and killed on drop, on every return path.

use std::time::{Duration, Instant, SystemTime};

use debvisor_tests::{CephCluster, DaemonBuilder, DaemonProcess, EtcdProcess};

use super::clock::{epoch_micros, now_utc_string, parse_rfc3339_micros};
use super::host::load_text;
use super::logs::str_field;
use super::report::{bench_command, publish, Machine};
use super::stats::summarize;
use crate::{Args, BenchResult};

/// Start marker of the generated section in `docs/benchmarks.md`.
const MARK_START: &str = "<!-- bench:ceph-objects:start -->";
/// End marker of the generated section in `docs/benchmarks.md`.
const MARK_END: &str = "<!-- bench:ceph-objects:end -->";
/// Snapshot requests measured.
const SNAPSHOTS: usize = 10;
/// Pool and volume of the figure.
const POOL: &str = "dv-bench";
const IMAGE: &str = "snapvol";
/// Generous deadlines (not speed claims).
const SETTLE: Duration = Duration::from_secs(120);
/// `ceph.interval` / `ceph.timeout` of the daemon (the defaults).
const CEPH_INTERVAL: &str = "10s";
const CEPH_TIMEOUT: &str = "30s";

/// Samples in milliseconds.
#[derive(Default)]
struct Samples {
    rbd_seen: Vec<f64>,
    step_done: Vec<f64>,
    status_ready: Vec<f64>,
    ls_call: Vec<f64>,
    snap_create: Vec<f64>,
}

fn wait(what: &str, mut f: impl FnMut() -> BenchResult<bool>) -> BenchResult<()> {
    let until = Instant::now() + SETTLE;
    while !f()? {
        if Instant::now() > until {
            return Err(format!("timed out after {SETTLE:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn status_state(etcd: &EtcdProcess, key: &str) -> BenchResult<Option<String>> {
    let raw = etcd
        .get_key(key)
        .map_err(|e| format!("etcd get {key}: {e}"))?;
    Ok(raw.and_then(|r| {
        serde_json::from_str::<serde_json::Value>(&r)
            .ok()
            .and_then(|v| v["state"].as_str().map(str::to_owned))
    }))
}

fn snap_names(cluster: &CephCluster) -> BenchResult<Vec<String>> {
    let out = cluster
        .rbd(&["snap", "ls", &format!("{POOL}/{IMAGE}"), "--format", "json"])
        .map_err(|e| format!("rbd snap ls: {e}"))?;
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&out).map_err(|e| format!("rbd snap ls json: {e}"))?;
    Ok(v.iter()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect())
}

/// The daemon's timestamp (µs since the epoch) of the `rbd snap create` of `snap`.
fn step_done_at(daemon: &DaemonProcess, snap: &str) -> Option<i64> {
    let want = format!("CreateSnapshot(\"{snap}\")");
    daemon.json_lines().iter().find_map(|v| {
        (str_field(v, "message") == Some("ceph volume step done")
            && str_field(v, "step") == Some(want.as_str()))
        .then(|| str_field(v, "timestamp").and_then(parse_rfc3339_micros))
        .flatten()
    })
}

fn measure() -> BenchResult<(Samples, f64)> {
    let cluster = CephCluster::start().map_err(|e| format!("starting Ceph: {e}"))?;
    let started_in = cluster.started_in().as_secs_f64();
    let etcd = EtcdProcess::start().map_err(|e| format!("starting etcd: {e}"))?;
    let yaml = format!(
        "ceph:\n  enabled: true\n  conf: {}\n  client: {}\n  keyring: {}\n  interval: {CEPH_INTERVAL}\n  timeout: {CEPH_TIMEOUT}\n",
        cluster.conf_path().display(),
        cluster.client(),
        cluster.keyring_path().display()
    );
    let mut daemon = DaemonBuilder::new("bench-ceph")
        // `debug` for the driver's per-call `ceph call` lines (their `ms`).
        .env("DEBVISOR_LOGGING_LEVEL", "debug")
        .endpoints(&[etcd.endpoint()])
        .yaml(&yaml)
        .spawn()
        .map_err(|e| format!("spawning debvisord: {e}"))?;
    daemon
        .wait_run(SETTLE)
        .map_err(|e| format!("debvisord to run: {e}"))?;
    let put = |k: &str, v: &str| etcd.put_key(k, v).map_err(|e| format!("etcd put {k}: {e}"));
    put(
        &format!("ceph/pools/{POOL}/spec"),
        r#"{"pg_num":8,"size":1}"#,
    )?;
    wait("the pool ready", || {
        Ok(status_state(&etcd, &format!("ceph/pools/{POOL}/status"))?.as_deref() == Some("ready"))
    })?;
    put(
        &format!("ceph/volumes/{POOL}:{IMAGE}/spec"),
        r#"{"size":"8M"}"#,
    )?;
    wait("the volume ready", || {
        Ok(
            status_state(&etcd, &format!("ceph/volumes/{POOL}:{IMAGE}/status"))?.as_deref()
                == Some("ready"),
        )
    })?;

    let mut s = Samples::default();
    for i in 0..SNAPSHOTS {
        let snap = format!("b{i}");
        let wall0 = epoch_micros(SystemTime::now());
        let t0 = Instant::now();
        put(
            &format!("ceph/volumes/{POOL}:{IMAGE}/snapshots/{snap}/spec"),
            "{}",
        )?;
        let until = t0 + SETTLE;
        loop {
            let c0 = Instant::now();
            let names = snap_names(&cluster)?;
            let c1 = Instant::now();
            s.ls_call.push((c1 - c0).as_secs_f64() * 1000.0);
            if names.contains(&snap) {
                s.rbd_seen.push((c1 - t0).as_secs_f64() * 1000.0);
                break;
            }
            if c1 > until {
                return Err(format!("snapshot {snap} never appeared in Ceph"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let key = format!("ceph/volumes/{POOL}:{IMAGE}/snapshots/{snap}/status");
        loop {
            if status_state(&etcd, &key)?.as_deref() == Some("ready") {
                s.status_ready.push(t0.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > until {
                return Err(format!("snapshot {snap} never ready in etcd"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut done = None;
        wait("the daemon's step line", || {
            done = step_done_at(&daemon, &snap);
            Ok(done.is_some())
        })?;
        if let Some(at) = done {
            s.step_done.push((at - wall0) as f64 / 1000.0);
        }
    }
    s.snap_create = daemon
        .json_lines()
        .iter()
        .filter(|v| {
            str_field(v, "message") == Some("ceph call")
                && str_field(v, "command").is_some_and(|c| c.starts_with("rbd snap create"))
        })
        .filter_map(|v| v["ms"].as_f64())
        .collect();
    drop(daemon);
    drop(etcd);
    drop(cluster);
    Ok((s, started_in))
}

/// Run the figure, print it and (unless `--no-write`) write its section of the docs.
pub(crate) fn run(args: &Args, machine: &Machine) -> BenchResult<()> {
    if !debvisor_tests::ceph_installed() {
        return Err("the Ceph binaries are not installed (scripts/deps.sh)".into());
    }
    let started = now_utc_string();
    eprintln!(
        "debvisor-bench: [ceph-objects] snapshot request → snapshot in Ceph, {SNAPSHOTS} requests"
    );
    let load_start = load_text();
    let (s, ceph_start) = measure()?;
    let load = format!("{load_start} / {}", load_text());
    let report = render(args, machine, &started, &s, ceph_start, &load);
    publish(args, MARK_START, MARK_END, &report)
}

fn render(
    args: &Args,
    m: &Machine,
    started: &str,
    s: &Samples,
    ceph_start: f64,
    load: &str,
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Ceph objects: snapshot request → snapshot in Ceph ({started})\n"
    );
    let _ = writeln!(o, "- command: `{}`", bench_command(args, m));
    let _ = writeln!(o, "- machine: {m}");
    let _ = writeln!(
        o,
        "- profile: `{}` (bench and `debvisord`); one-host Ceph from the test harness (1 mon, \
         1 mgr, 2 memstore OSDs, cephx; up in {ceph_start:.1} s), etcd 3.4 on loopback, one \
         standalone `debvisord` (primary) with `ceph.interval` {CEPH_INTERVAL}, \
         `ceph.timeout` {CEPH_TIMEOUT}, log level `debug`; pool `{POOL}` size 1, volume 8 MiB\n",
        m.profile
    );
    let _ = writeln!(
        o,
        "{SNAPSHOTS} snapshot specs written one after another (`…/snapshots/b<i>/spec` = \
         `{{}}`). *Seen in Ceph*: the bench's wall clock before the etcd put → return of the \
         bench's first `rbd snap ls` (polled every 10 ms) that lists it, so it includes up to \
         one `rbd snap ls` (last row). *Step done*: → the daemon's `ceph volume step done` \
         line (`rbd snap create` returned; daemon clock, same host). *Status ready*: → the \
         snapshot status `ready` read from etcd (polled every 5 ms once Ceph showed it). One \
         reconcile looks at the volume in-process over librbd (size, snapshots, protection; \
         `rbd info` + `rbd snap ls` without the library), then runs `rbd snap create`, a \
         process with its own mon session, plus two etcd reads and one transaction; \
         it writes `pending` and requeues itself after 100 ms, and that confirming pass \
         (observing again) writes `ready`.\n"
    );
    let _ = writeln!(o, "| measure (ms) | median | p90 | min | max |");
    let _ = writeln!(o, "|---|---:|---:|---:|---:|");
    for (name, xs) in [
        ("**write → seen in Ceph (`rbd snap ls`)**", &s.rbd_seen),
        ("write → `ceph volume step done` (daemon)", &s.step_done),
        (
            "of which the daemon's `rbd snap create` (its `ceph call` debug line)",
            &s.snap_create,
        ),
        ("write → status `ready` in etcd", &s.status_ready),
        ("one `rbd snap ls` of the bench", &s.ls_call),
    ] {
        let x = summarize(xs);
        let _ = writeln!(
            o,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} |",
            x.median, x.p90, x.min, x.max
        );
    }
    let _ = writeln!(
        o,
        "\nLoad average (1 min) at the start / end: {load} (the machine is shared; every \
         `rbd` call is a process start plus a mon session, so it scales with load)."
    );
    o
}
