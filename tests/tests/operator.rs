//! The operator's view against a real etcd and a real daemon (libvirt's test driver): a
//! `--wait` that prints each change as it happens and, on timeout, the reason the node
//! reported in etcd (here: the drain's placement refusal); the cluster summary and its exit
//! code; the human `node show`/`vm show`; one-line errors that name the likely cause.

use std::process::Output;
use std::time::Duration;

use debvisor_tests::libvirt::{random_uuid, test_driver_xml, unique_name};
use debvisor_tests::{eventually, CtlCluster as Cluster, DaemonBuilder};
use serde_json::Value;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One node alone: a flush has nowhere to put its VM, so `--wait` times out naming the
/// placement refusal the daemon wrote to `nodes/<n>/drain`; `status` reports the drain as a
/// problem (exit 3); unflush brings the node back (exit 0); a stopped daemon makes the
/// summary name the node down.
#[test]
fn a_wait_explains_itself_and_the_summary_exit_code_follows_the_cluster() {
    let cl = Cluster::start();
    let node = "op-a";
    let mut d = DaemonBuilder::new(node)
        .endpoints(&[cl.endpoint().to_string()])
        .clustered(&[node])
        // The machine is shared and busy: load must not make the node DEGRADED here.
        .yaml("node_status:\n  load_percent_per_cpu: 100000\n")
        .spawn()
        .expect("spawn daemon");
    d.wait_run(Duration::from_secs(30))
        .expect("daemon reaches run");
    eventually("health reported", Duration::from_secs(60), || {
        cl.etcd
            .get_key(&format!("nodes/{node}/health"))
            .ok()
            .flatten()
    });
    // The primary is elected shortly after run.
    eventually("a primary", Duration::from_secs(60), || {
        let out = cl.run(&["status"]);
        (out.status.code() == Some(0)).then_some(out)
    });
    let out = cl.run(&["status"]);
    let text = stdout(&out);
    for needle in [
        format!("PRIMARY   {node}"),
        format!("NODES     1/1 alive: {node} OK"),
        "VMS       0 running of 0, 0 in error".into(),
        "PROBLEMS  none".into(),
        "NODE".into(),
    ] {
        assert!(text.contains(&needle), "{needle:?} in\n{text}");
    }
    println!("$ debvisorctl status\n{text}");

    // A VM on the node, started with a wait that prints its progress.
    let name = unique_name("op");
    let xml = cl.dir().join("vm.xml");
    std::fs::write(&xml, test_driver_xml(&name, &random_uuid())).expect("xml");
    let xml = xml.to_string_lossy().into_owned();
    cl.ok(&["vm", "define", &xml, "--node", node, "--stopped"]);
    let out = cl.run(&["vm", "start", &name, "--wait", "--timeout", "90s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let progress = stderr(&out);
    assert!(
        progress
            .lines()
            .any(|l| l.starts_with('[') && l.contains("s] ")),
        "progress lines on stderr: {progress}"
    );
    assert!(
        progress
            .lines()
            .last()
            .is_some_and(|l| l.contains("running on op-a")),
        "the last progress line is the state reached: {progress}"
    );
    println!(
        "$ debvisorctl vm start {name} --wait\n{progress}{}",
        stdout(&out)
    );

    let show = eventually("stats reported", Duration::from_secs(60), || {
        let show = cl.ok(&["vm", "show", &name]);
        show.contains("% of one core").then_some(show)
    });
    for needle in [
        "running on op-a for",
        "% of one core",
        "memory",
        "autostart",
    ] {
        assert!(show.contains(needle), "{needle:?} in\n{show}");
    }
    println!("$ debvisorctl vm show {name}\n{show}");
    let nshow = cl.ok(&["node", "show", node]);
    for needle in ["memory", "primary"] {
        assert!(nshow.contains(needle), "{needle:?} in\n{nshow}");
    }
    println!("$ debvisorctl node show {node}\n{nshow}");
    let unknown = cl.run(&["node", "show", "nosuchnode"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains(node),
        "an unknown node lists the known ones: {}",
        stderr(&unknown)
    );

    // Flush with nowhere to go: the wait prints the node's drain report as it changes and
    // times out with the reason.
    let out = cl.run(&["node", "flush", node, "--wait", "--timeout", "8s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    let last = e.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("debvisorctl: timed out after 8s waiting for node op-a to be flushed; domain_state is flush; the node reports flush: 1 VM(s) left; ")
            && last.contains(&format!("{name}: keeps running here:")),
        "{e}"
    );
    assert!(
        e.lines()
            .any(|l| l.starts_with('[') && l.contains(&format!("{name}: keeps running here"))),
        "a progress line with the reason before the timeout: {e}"
    );
    println!("$ debvisorctl node flush {node} --wait --timeout 8s\n{e}");
    let shown: Value = cl.json(&["node", "show", node]);
    assert_eq!(shown["drain"]["remaining"], 1, "{shown}");

    // The summary lists the drain as a problem: exit 3.
    let out = cl.run(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!("node {node} drain: flush: 1 VM(s) left")),
        "{}",
        stdout(&out)
    );
    let out = cl.run(&["cluster", "status", "-o", "json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("summary JSON");
    assert_eq!(v["attention"], true, "{v}");

    // Unflush: back to ready, nothing left to report.
    let out = cl.run(&["node", "unflush", node, "--wait", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("node {node} ready\n"));
    eventually("status clean again", Duration::from_secs(30), || {
        (cl.run(&["status"]).status.code() == Some(0)).then_some(())
    });

    // A stopped daemon: its lease is revoked at once, the summary names it down.
    cl.ok(&["vm", "stop", &name, "--wait", "--timeout", "60s"]);
    d.signal(libc::SIGTERM).expect("sigterm");
    d.wait_exit(Duration::from_secs(60)).expect("daemon exits");
    let out = eventually("node down in the summary", Duration::from_secs(30), || {
        let out = cl.run(&["status"]);
        stdout(&out)
            .contains(&format!("node {node} is DOWN"))
            .then_some(out)
    });
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(stdout(&out).contains("0/1 alive"), "{}", stdout(&out));
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with(node) && l.ends_with("DOWN: no lease")),
        "{}",
        stdout(&out)
    );
    println!("$ debvisorctl status\n{}", stdout(&out));
}

/// An etcd nobody listens on: one line naming the endpoint and the likely cause; the chain
/// only with `-v`. `schema` and `completion` need no etcd at all.
#[test]
fn errors_are_one_line_with_the_likely_cause() {
    let ctl = debvisor_tests::daemon::bin_path("debvisorctl");
    let run = |args: &[&str]| {
        std::process::Command::new(&ctl)
            .args(args)
            .env("HOME", "/nonexistent")
            .output()
            .expect("run debvisorctl")
    };
    let out = run(&["--endpoints", "http://127.0.0.1:9", "status"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("cannot reach etcd at http://127.0.0.1:9: connection refused — is etcd running")
            && !e.contains("tonic"),
        "{e}"
    );
    let v = run(&["--endpoints", "http://127.0.0.1:9", "status", "-v"]);
    assert!(stderr(&v).contains("tonic::transport"), "{}", stderr(&v));
    let s = run(&["--endpoints", "http://127.0.0.1:9", "schema"]);
    assert!(s.status.success() && stdout(&s).contains("nodes/<node>/drain"));
    let c = run(&["completion", "bash"]);
    assert!(c.status.success() && stdout(&c).contains("debvisorctl"));
}
