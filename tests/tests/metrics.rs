//! `GET /metrics` of a real daemon over HTTP, parsed with a Prometheus text-format parser:
//! the node's series, a VM it runs (memory, vCPUs, CPU time), VMs by state, the reactors'
//! counters, queues and reconcile histograms, the lease renewals, the keepalive transaction
//! histogram, store errors, stage durations and the role; and what a scrape costs (bytes,
//! time).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use debvisor_tests::libvirt::{random_uuid, test_driver_xml, unique_name};
use debvisor_tests::{eventually, free_port, CtlCluster as Cluster, DaemonBuilder};
use prometheus_parse::{HistogramCount, Sample, Scrape, Value};

/// One HTTP/1.1 GET; the status line and the body.
fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

fn value(s: &Sample) -> f64 {
    match s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        _ => f64::NAN,
    }
}

/// The buckets of histogram `metric` with `labels`, checked for shape: cumulative counts
/// that never fall, ending in `+Inf`, with `_count` equal to the `+Inf` bucket and a `_sum`.
/// Returns the count.
fn histogram(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let s = find(scrape, metric, labels)?;
    let Value::Histogram(buckets) = &s.value else {
        panic!("{metric} {labels:?} is not a histogram: {:?}", s.value);
    };
    let counts: Vec<&HistogramCount> = buckets.iter().collect();
    assert!(counts.len() >= 2, "{metric}: {counts:?}");
    assert!(
        counts.windows(2).all(|w| w[0].count <= w[1].count),
        "{metric}: buckets not cumulative: {counts:?}"
    );
    let last = counts.last()?;
    assert!(last.less_than.is_infinite(), "{metric}: {counts:?}");
    assert!(counts.iter().any(|c| (c.less_than - 0.001).abs() < 1e-12));
    assert!(counts.iter().any(|c| (c.less_than - 30.0).abs() < 1e-12));
    let count = value(find(scrape, &format!("{metric}_count"), labels)?);
    assert_eq!(count, last.count, "{metric}: _count is the +Inf bucket");
    let sum = value(find(scrape, &format!("{metric}_sum"), labels)?);
    assert!(sum >= 0.0, "{metric}_sum {sum}");
    Some(count)
}

fn find<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

#[test]
fn a_real_daemon_serves_metrics_a_prometheus_parser_reads() {
    let cl = Cluster::start();
    let node = "met-a";
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut d = DaemonBuilder::new(node)
        .endpoints(&[cl.endpoint().to_string()])
        .clustered(&[node])
        .env("DEBVISOR_METRICS_LISTEN", &addr)
        .spawn()
        .expect("spawn daemon");
    d.wait_run(Duration::from_secs(30))
        .expect("daemon reaches run");
    let name = unique_name("met");
    let xml = cl.dir().join("vm.xml");
    std::fs::write(&xml, test_driver_xml(&name, &random_uuid())).expect("xml");
    let xml = xml.to_string_lossy().into_owned();
    cl.ok(&["vm", "define", &xml, "--node", node, "--stopped"]);
    cl.ok(&["vm", "start", &name, "--wait", "--timeout", "90s"]);

    let last = std::cell::RefCell::new(String::new());
    let scrape = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eventually(
            "the VM's stats in a scrape",
            Duration::from_secs(60),
            || {
                let (status, body) = get(&addr, "/metrics");
                assert!(status.contains(" 200 "), "{status}");
                *last.borrow_mut() = body.clone();
                let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).ok()?;
                find(&scrape, "debvisor_vm_memory_bytes", &[("vm", &name)])?;
                find(&scrape, "debvisor_node_memory_bytes", &[("kind", "total")])?;
                // A few keepalive ticks and lease renewals have happened.
                let renewals = find(&scrape, "debvisor_lease_renewals_total", &[])?;
                (value(renewals) > 0.0).then_some(())?;
                let ticks = histogram(&scrape, "debvisor_keepalive_txn_duration_seconds", &[])?;
                (ticks > 0.0).then_some(())?;
                for kind in ["vm", "node"] {
                    let n = histogram(
                        &scrape,
                        "debvisor_reactor_reconcile_duration_seconds",
                        &[("kind", kind)],
                    )?;
                    (n > 0.0).then_some(())?;
                }
                Some(scrape)
            },
        )
    }))
    .unwrap_or_else(|_| panic!("last scrape:\n{}", last.borrow()));
    let v = |m: &str, l: &[(&str, &str)]| {
        find(&scrape, m, l)
            .map(value)
            .unwrap_or_else(|| panic!("{m} {l:?} in the scrape"))
    };
    assert_eq!(
        v("debvisor_vm_memory_bytes", &[("vm", &name)]),
        64.0 * 1024.0 * 1024.0
    );
    assert_eq!(v("debvisor_vm_vcpus", &[("vm", &name)]), 1.0);
    assert!(v("debvisor_vm_cpu_seconds_total", &[("vm", &name)]) >= 0.0);
    assert!(v("debvisor_node_memory_bytes", &[("kind", "total")]) > 0.0);
    assert!(v("debvisor_node_load", &[("period", "1m")]) >= 0.0);
    assert_eq!(v("debvisor_vms", &[("state", "running")]), 1.0);
    assert_eq!(v("debvisor_vms", &[("state", "fail")]), 0.0);
    assert_eq!(v("debvisor_node_alive", &[]), 1.0);
    assert!(v("debvisor_reactor_reconciles_total", &[("kind", "vm")]) >= 1.0);
    assert!(v("debvisor_reactor_lists_total", &[("kind", "node")]) >= 1.0);

    // Reactors: the histogram counts every reconcile the counter counts (read in the same
    // scrape), and a queue depth per kind.
    for kind in ["vm", "node", "network"] {
        let n = histogram(
            &scrape,
            "debvisor_reactor_reconcile_duration_seconds",
            &[("kind", kind)],
        )
        .unwrap_or_else(|| panic!("reconcile histogram of {kind}"));
        assert!(n <= v("debvisor_reactor_reconciles_total", &[("kind", kind)]));
        assert!(v("debvisor_reactor_queue_depth", &[("kind", kind)]) >= 0.0);
    }
    // Lease and keepalive.
    assert!(v("debvisor_lease_renewals_total", &[]) >= 1.0);
    assert_eq!(v("debvisor_lease_renewal_failures_total", &[]), 0.0);
    let renewals = histogram(&scrape, "debvisor_lease_renewal_duration_seconds", &[])
        .expect("lease renewal histogram");
    assert_eq!(renewals, v("debvisor_lease_renewals_total", &[]));
    // Store errors: one series per operation of the closed set, none failed here.
    for op in [
        "get", "list", "put", "txn", "delete", "watch", "lease", "other",
    ] {
        assert_eq!(v("debvisor_store_request_errors_total", &[("op", op)]), 0.0);
    }
    // Startup stages: config ran; every stage that ran has a duration.
    assert!(v("debvisor_stage_duration_seconds", &[("stage", "config")]) >= 0.0);
    assert!(v("debvisor_stage_duration_seconds", &[("stage", "objects")]) > 0.0);
    assert!(
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == "debvisor_stage_duration_seconds")
            .count()
            <= 13
    );
    // The only node of its cluster becomes the primary.
    let primary = eventually("this node primary", Duration::from_secs(60), || {
        let (_, body) = get(&addr, "/metrics");
        let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).ok()?;
        let p = value(find(&scrape, "debvisor_node_primary", &[])?);
        (p == 1.0).then_some(p)
    });
    assert_eq!(primary, 1.0);
    // Ceph is not enabled here: no Ceph series.
    assert!(scrape
        .samples
        .iter()
        .all(|s| !s.metric.starts_with("debvisor_ceph_")));
    // Bounded: only this node's VMs carry per-VM series.
    assert!(scrape
        .samples
        .iter()
        .filter(|s| s.metric.starts_with("debvisor_vm_"))
        .all(|s| s.labels.get("vm") == Some(name.as_str())));

    // Bounded: at most the fixed series of docs/metrics.md (148 with firewall and Ceph)
    // plus 7 per owned VM.
    let (_, body) = get(&addr, "/metrics");
    let series = body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    println!("series in a scrape with 1 VM: {series}");
    assert!(series <= 148 + 7, "{series} series:\n{body}");

    // What a scrape costs, seen from the scraper.
    let t = Instant::now();
    let n = 20;
    let mut bytes = 0;
    for _ in 0..n {
        bytes = get(&addr, "/metrics").1.len();
    }
    println!(
        "scrape of 1 VM: {bytes} bytes, {:.2} ms per scrape (mean of {n})",
        t.elapsed().as_secs_f64() * 1000.0 / f64::from(n)
    );
    let (status, _) = get(&addr, "/other");
    assert!(status.contains(" 404 "), "{status}");
}
