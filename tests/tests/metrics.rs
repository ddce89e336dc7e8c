//! `GET /metrics` of a real daemon over HTTP, parsed with a Prometheus text-format parser:
//! the node's series, a VM it runs (memory, vCPUs, CPU time), VMs by state and the
//! reactors' counters; and what a scrape costs (bytes, time).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use debvisor_tests::libvirt::{random_uuid, test_driver_xml, unique_name};
use debvisor_tests::{eventually, free_port, CtlCluster as Cluster, DaemonBuilder};
use prometheus_parse::{Sample, Scrape, Value};

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
    // Bounded: only this node's VMs carry per-VM series.
    assert!(scrape
        .samples
        .iter()
        .filter(|s| s.metric.starts_with("debvisor_vm_"))
        .all(|s| s.labels.get("vm") == Some(name.as_str())));

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
